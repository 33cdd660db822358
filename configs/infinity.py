"""Infinity configs: `get_config(arg)`.

VAE only (`config.vae` builds `bitgen.models.infinity_vae.InfinityVAEConfig` via `configlib.from_dict`):
- "vae_d16" | "vae_d24" | "vae_d32" | "vae_d64": the released tokenizers (base 128 channels,
  ch_mult (1, 2, 4, 4, 4), stride 16, d bits per token; `tools/run_infinity.py::load_visual_tokenizer`).
- "vae_d14_f8": the stride-8 tokenizer of Infinity-8B (ch_mult (1, 2, 4, 4), 14 bits; the
  transformer sees 2x2 patches of it, 56 bits per token).
- "vae_tiny": base 32, ch_mult (1, 1, 1, 2, 2), 16 bits (the parity fixture's VAE).
- "vae_cpu": base 24, ch_mult (1, 1, 2, 2), stride 8, 16 bits (what a shared 2-core CPU trains in
  minutes; used with 1 res block by "train_tiny_vae").

Transformer + its VAE (`config.model` -> `bitgen.models.infinity.InfinityConfig`, `config.vae`,
`config.pn` the default resolution name of `bitgen.models.infinity_schedules`):
- "tiny": width 96, 4 blocks, 2 heads, 16 bits, 512 text channels (the parity fixture's model).
- "layer12": width 768, 12 blocks, 8 heads (official `infinity_layer12`, 125M), d32 VAE.
- "2b": width 2048, 32 blocks, 16 heads (official `infinity_2b`, 2.2B), d32 VAE, flan-T5-XL text.
- "8b": width 3584, 40 blocks, 28 heads (official `infinity_8b`, 8.4B), d14 stride-8 VAE with 2x2
  spatial patchify (56 bits per token).

Training on the embedded photos, class-conditional (label = source photo), sized for a 2-core CPU:
- "train_tiny_vae": stage 1, the "vae_cpu" VAE as a tokenizer (task "infinity_vae": L1 + multi-scale
  quantizer loss) on 32 px crops (4x4 latents: 3 scales); 300 steps.
- "train_tiny": stage 2, a class-conditional transformer (task "infinity") on the frozen stage-1
  VAE read from `vae_source` (that run's workdir), with the official recipe: bitwise
  self-correction (flip p in {0, .01, .., .30} on the first 13 scales), scale-reweighted bit loss,
  10% condition dropout, AdamW (0.9, 0.97), weight decay 0.005, grad clip 5, constant lr
  6e-3 * batch / 256 (train.sh: tblr 6e-3, sche lin0 with wpe 1); 400 steps. `config.sample`
  holds the `bitgen sample` defaults (CFG, tau, top-k / top-p, grid columns).
`bitgen.train.infinity.train_and_evaluate` runs both and reports held-out bits per bit
(bitgen/bench/RESULTS_infinity.md). Both build their task with `bitgen.train.infinity.build_task(config)`.
"""

import ml_collections

VAE_VARIANTS = {
    # name: (codebook_dim, base_channels, channel_mult, patch_size)
    "vae_tiny": (16, 32, (1, 1, 1, 2, 2), 16),
    "vae_cpu": (16, 24, (1, 1, 2, 2), 8),
    "vae_d16": (16, 128, (1, 2, 4, 4, 4), 16),
    "vae_d24": (24, 128, (1, 2, 4, 4, 4), 16),
    "vae_d32": (32, 128, (1, 2, 4, 4, 4), 16),
    "vae_d64": (64, 128, (1, 2, 4, 4, 4), 16),
    "vae_d14_f8": (14, 128, (1, 2, 4, 4), 8),
}


def vae_config(variant: str, num_res_blocks: int = 2) -> ml_collections.ConfigDict:
  if variant not in VAE_VARIANTS:
    raise ValueError(f"unknown Infinity VAE variant {variant!r}; known: {sorted(VAE_VARIANTS)}")
  codebook_dim, base_channels, channel_mult, patch_size = VAE_VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      codebook_dim=codebook_dim,
      base_channels=base_channels,
      channel_mult=channel_mult,
      num_res_blocks=num_res_blocks,
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
      spatial_patchify=patchify,
      linear="dense",
      attention="dense",
  ))


NUM_PHOTOS = 10  # labels of the embedded photos (bitgen.data.embedded_photos.PHOTO_NAMES)


def train_tiny_vae_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      task="infinity_vae",
      model=vae_config("vae_cpu", num_res_blocks=1),
      data=dict(name="embedded_photos", image_size=32),
      train=dict(batch_size=16, steps=300, seed=0, lr=1e-3, warmup_steps=100, lr_end_factor=0.1,
                 b1=0.9, b2=0.95, weight_decay=1e-4, ema_decay=None,
                 loss=dict(reconstruct_weight=1.0, codebook_weight=0.1, codebook_rampup_multiplier=1.0)),
      checkpoint=dict(every=500, keep=2),
      log=dict(every=50, grid_every=500, grid_images=8),
      mesh=dict(shape=(1, -1, 1)),
  ))


def train_tiny_config(vae_source: str = "workdirs/infinity_tiny_vae") -> ml_collections.ConfigDict:
  batch_size = 32
  stage1 = train_tiny_vae_config()
  model = ml_collections.ConfigDict(dict(
      embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, num_bits=stage1.model.codebook_dim,
      text_channels=128, text_maxlen=1, num_classes=NUM_PHOTOS, norm_eps=1e-6,
      spatial_patchify=False, linear="dense", attention="dense"))
  return ml_collections.ConfigDict(dict(
      task="infinity",
      model=model,
      vae=stage1.model,
      vae_stage=stage1,
      vae_source=vae_source,
      data=dict(name="embedded_photos", image_size=32),
      train=dict(batch_size=batch_size, steps=400, seed=0, lr=6e-3 * batch_size / 256, warmup_steps=50,
                 lr_start_factor=0.0, lr_end_factor=1.0, b1=0.9, b2=0.97, weight_decay=0.005,
                 grad_clip_norm=5.0, ema_decay=None,
                 loss=dict(cond_drop_rate=0.1, noise_strength=0.3, noise_layers=13, requantize=True,
                           num_train_scales=100, reweight_by_scale=True, label_smoothing=0.0)),
      checkpoint=dict(every=500, keep=2),
      log=dict(every=50, grid_every=500, grid_images=8),
      sample=dict(cfg=3.0, tau=1.0, top_k=0, top_p=0.0, columns=8),
      mesh=dict(shape=(1, -1, 1)),
  ))


TRAIN_VARIANTS = {"train_tiny_vae": train_tiny_vae_config, "train_tiny": train_tiny_config}


def get_config(arg: str = "2b") -> ml_collections.ConfigDict:
  if arg in VAE_VARIANTS:
    return ml_collections.ConfigDict(dict(vae=vae_config(arg)))
  if arg in MODEL_VARIANTS:
    vae, pn = MODEL_VARIANTS[arg][5], MODEL_VARIANTS[arg][7]
    return ml_collections.ConfigDict(dict(model=model_config(arg), vae=vae_config(vae), pn=pn))
  if arg in TRAIN_VARIANTS:
    return TRAIN_VARIANTS[arg]()
  known = sorted(MODEL_VARIANTS) + sorted(VAE_VARIANTS) + sorted(TRAIN_VARIANTS)
  raise ValueError(f"unknown Infinity config {arg!r}; known: {known}")
