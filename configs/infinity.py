"""Infinity configs: `get_config(arg)`.

VAE only (`config.vae` builds `bitgen.models.infinity_vae.InfinityVAEConfig` via `configlib.from_dict`):
- "vae_d16" | "vae_d24" | "vae_d32" | "vae_d64": the released tokenizers (base 128 channels,
  ch_mult (1, 2, 4, 4, 4), stride 16, d bits per token; `tools/run_infinity.py::load_visual_tokenizer`).
- "vae_d14_f8": the stride-8 tokenizer of Infinity-8B (ch_mult (1, 2, 4, 4), 14 bits; the
  transformer sees 2x2 patches of it, 56 bits per token).
- "vae_tiny": base 32, ch_mult (1, 1, 1, 2, 2), 16 bits (the parity fixture's VAE; trains on CPU).

Transformer + its VAE (`config.model` -> `bitgen.models.infinity.InfinityConfig`, `config.vae`,
`config.pn` the default resolution name of `bitgen.models.infinity_schedules`):
- "tiny": width 96, 4 blocks, 2 heads, 16 bits, 512 text channels (the parity fixture's model).
- "layer12": width 768, 12 blocks, 8 heads (official `infinity_layer12`, 125M), d32 VAE.
- "2b": width 2048, 32 blocks, 16 heads (official `infinity_2b`, 2.2B), d32 VAE, flan-T5-XL text.
- "8b": width 3584, 40 blocks, 28 heads (official `infinity_8b`, 8.4B), d14 stride-8 VAE with 2x2
  spatial patchify (56 bits per token).
"""

import ml_collections

VAE_VARIANTS = {
    # name: (codebook_dim, base_channels, channel_mult, patch_size)
    "vae_tiny": (16, 32, (1, 1, 1, 2, 2), 16),
    "vae_d16": (16, 128, (1, 2, 4, 4, 4), 16),
    "vae_d24": (24, 128, (1, 2, 4, 4, 4), 16),
    "vae_d32": (32, 128, (1, 2, 4, 4, 4), 16),
    "vae_d64": (64, 128, (1, 2, 4, 4, 4), 16),
    "vae_d14_f8": (14, 128, (1, 2, 4, 4), 8),
}


def vae_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in VAE_VARIANTS:
    raise ValueError(f"unknown Infinity VAE variant {variant!r}; known: {sorted(VAE_VARIANTS)}")
  codebook_dim, base_channels, channel_mult, patch_size = VAE_VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      codebook_dim=codebook_dim,
      base_channels=base_channels,
      channel_mult=channel_mult,
      num_res_blocks=2,
      patch_size=patch_size,
      image_channels=3,
  ))


MODEL_VARIANTS = {
    # name: (embed_dim, depth, num_heads, text_channels, text_maxlen, vae variant, patchify, pn)
    "tiny": (96, 4, 2, 512, 16, "vae_tiny", False, "0.06M"),
    "layer12": (768, 12, 8, 2048, 512, "vae_d32", False, "0.06M"),
    "2b": (2048, 32, 16, 2048, 512, "vae_d32", False, "1M"),
    "8b": (3584, 40, 28, 2048, 512, "vae_d14_f8", True, "1M"),
}


def model_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in MODEL_VARIANTS:
    raise ValueError(f"unknown Infinity model variant {variant!r}; known: {sorted(MODEL_VARIANTS)}")
  embed_dim, depth, heads, text_channels, text_maxlen, vae, patchify, _ = MODEL_VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      embed_dim=embed_dim,
      depth=depth,
      num_heads=heads,
      mlp_ratio=4.0,
      num_bits=VAE_VARIANTS[vae][0] * (4 if patchify else 1),
      text_channels=text_channels,
      text_maxlen=text_maxlen,
      num_classes=0,
      norm_eps=1e-6,
      cond_drop_rate=0.1,
      spatial_patchify=patchify,
      linear="dense",
      attention="dense",
  ))


def get_config(arg: str = "2b") -> ml_collections.ConfigDict:
  if arg in VAE_VARIANTS:
    return ml_collections.ConfigDict(dict(vae=vae_config(arg)))
  if arg in MODEL_VARIANTS:
    vae, pn = MODEL_VARIANTS[arg][5], MODEL_VARIANTS[arg][7]
    return ml_collections.ConfigDict(dict(model=model_config(arg), vae=vae_config(vae), pn=pn))
  raise ValueError(f"unknown Infinity config {arg!r}; known: {sorted(MODEL_VARIANTS) + sorted(VAE_VARIANTS)}")
