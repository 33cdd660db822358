"""Infinity configs: `get_config(arg)`.

VAE only (`config.vae` builds `bitgen.models.infinity_vae.InfinityVAEConfig` via `configlib.from_dict`):
- "vae_d16" | "vae_d24" | "vae_d32" | "vae_d64": the released tokenizers (base 128 channels,
  ch_mult (1, 2, 4, 4, 4), stride 16, d bits per token; `tools/run_infinity.py::load_visual_tokenizer`).
- "vae_d14_f8": the stride-8 tokenizer of Infinity-8B (ch_mult (1, 2, 4, 4), 14 bits; the
  transformer sees 2x2 patches of it, 56 bits per token).
- "vae_tiny": base 32, ch_mult (1, 1, 1, 2, 2), 16 bits (the parity fixture's VAE; trains on CPU).
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


def get_config(arg: str = "vae_d32") -> ml_collections.ConfigDict:
  if arg in VAE_VARIANTS:
    return ml_collections.ConfigDict(dict(vae=vae_config(arg)))
  raise ValueError(f"unknown Infinity config {arg!r}; known: {sorted(VAE_VARIANTS)}")
