"""BSQ-ViT tokenizer configs: `get_config("tiny" | "small" | "b18" | "b36")`.

`config.model` builds `bitgen.models.bsq_vit.BSQViT`; `config.model.quantizer` is the dict
`bitgen.quantizers.build` takes. For b18 / b36, `config.train` holds the official training
hyper-parameters (`configs/tokenizer/imagenet_256x256_bsqvit_*.yaml` and
`scripts/main_image_tokenizer.py` of github.com/zhaoyue-zephyrus/bsq-vit) in the layout of
`bitgen.train.config`; the tiny and small runs set their own.

- tiny: 64x64 crops, patch 8 (64 tokens), width 128, 2 + 2 blocks, 18 bits; trains on a 2-core CPU.
- small: 128x128, patch 8, width 512, 8 + 8 blocks, 18 bits; one accelerator.
- main: the tiny model with everything the quick-start job needs (data, train, checkpoint, log).
- b18 / b36: the official B/8 at 256x256 (width 768, 12 + 12 blocks, 12 heads), 18 bits in 2 groups
  of 9 / 36 bits in groups of 1, analytical per-sample entropy. b18 has 174.8M parameters.
"""

import ml_collections

# (image_size, patch_size, width, depth, heads, decoder_ffn_dim, num_bits, group_size)
VARIANTS = {
    "tiny": (64, 8, 128, 2, 4, 512, 18, 9),
    "small": (128, 8, 512, 8, 8, 2048, 18, 9),
    "b18": (256, 8, 768, 12, 12, 3072, 18, 9),
    "b36": (256, 8, 768, 12, 12, 3072, 36, 1),
}


def quantizer_config(num_bits: int, group_size: int) -> dict:
  """The official BSQ settings; beta 0.25 is what the official model really uses (see below)."""
  return dict(
      name="bsq",
      num_bits=num_bits,
      group_size=group_size,
      persample_entropy="analytical",
      inv_temperature=1.0,
      # The yaml says `beta: 0.`, but `VITBSQModel` drops that kwarg and its quantizer runs with
      # the `VITVQModel` default 0.25 (see ../shared/parity/bsq_vit/README.md): we follow the code.
      beta=0.25,
      gamma0=1.0,
      gamma=1.0,
      zeta=1.0,
  )


def model_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown BSQ-ViT variant {variant!r}; known: {sorted(VARIANTS)}")
  image_size, patch_size, width, depth, heads, ffn_dim, num_bits, group_size = VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      image_size=image_size,
      patch_size=patch_size,
      width=width,
      depth=depth,
      heads=heads,
      mlp_ratio=4.0,
      decoder_ffn_dim=ffn_dim,
      channels=3,
      l2_normalize=True,
      attention="dense",
      linear="dense",
      quantizer=quantizer_config(num_bits, group_size),
  ))


def official_train_config() -> ml_collections.ConfigDict:
  """The official B/8 recipe in `bitgen.train.config`'s layout (keys of `config.train`).

  Official: AdamW(0.9, 0.99, eps 1e-8, wd 1e-4); lr = 4e-7 * global batch (`base_lr * world_size *
  batch_size` in main_image_tokenizer.py, 32 images per GPU; 8 GPUs assumed here); multiplier 0.1 ->
  1.0 over 5k warm-up steps then a cosine to 0.5 at 1M steps; EMA 0.999 (`--use-ema`); loss
  L1 + 0.1 LPIPS + 0.1 StyleGAN + 0.1 * (3.0 -> 1.0 over 2k steps) * quantizer loss; the StyleGAN
  discriminator trains with the same optimizer settings.
  """
  batch_size = 32 * 8
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size,
      steps=1_000_000,
      lr=4e-7 * batch_size,
      warmup_steps=5_000,
      decay_steps=1_000_000,
      lr_start_factor=0.1,
      lr_end_factor=0.5,
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=1e-4,
      ema_decay=0.999,
      loss=dict(
          reconstruct_weight=1.0,
          codebook_weight=0.1,
          codebook_rampup_multiplier=3.0,
          codebook_rampup_steps=2_000,
          # Official 0.1 (VGG LPIPS): needs a user-supplied weight file (`lpips_weights`); off here.
          perceptual_weight=0.0,
          # Official StyleGAN term (disc_weight 0.1, disc_start 0, vanilla loss, fixed weight):
          # the discriminator trains from scratch. Its R1 (disc_reg_r1 10 every 16 steps) changes
          # no gradient officially (see bitgen.train.gan), so it stays off.
          gan_weight=0.1,
          gan_start=0,
          gan_loss="vanilla",
      ),
  ))


def main_job_config() -> ml_collections.ConfigDict:
  """The README's quick-start job: the tiny model on 64 px crops of the embedded photos.

  Sized for a 2-core CPU in under 10 minutes. The photos are resized to a short side of 128 px
  before cropping (evaluation), and to a random one of 128..256 px per training crop (scale
  augmentation): the usual resize-then-crop protocol, where a 64 px crop holds a good part of a
  scene. Official loss (L1 + ramped quantizer loss) with the quantizer term at 0.03 instead of 0.1
  (in so short a run the entropy terms cost reconstruction: 0.1 gave ~0.8 dB less held-out PSNR in a
  sweep); a higher learning rate and a short warm-up than the B/8 recipe, since the run is short.
  """
  # Imported here: models load this file on machines without tfds. `with_defaults` lists every
  # key, so any of them can be overridden (`--set log.progress=False`).
  from bitgen import data  # pylint: disable=g-import-not-at-top
  from bitgen.train.config import with_defaults  # pylint: disable=g-import-not-at-top
  from bitgen.train.tokenizer import LOSS_DEFAULTS  # pylint: disable=g-import-not-at-top
  data_config = data.get_config("embedded_photos", image_size=64)
  data_config.update(short_side=128, train_short_sides=(128, 160, 192, 256))
  return with_defaults(ml_collections.ConfigDict(dict(
      model=model_config("tiny"),
      data=data_config,
      train=dict(batch_size=32, steps=1500, seed=0, lr=1e-3, warmup_steps=100, lr_end_factor=0.05,
                 ema_decay=None,
                 loss=dict(LOSS_DEFAULTS, codebook_weight=0.03, codebook_rampup_steps=200)),
      checkpoint=dict(every=500, keep=2),
      log=dict(every=50, grid_every=500, grid_images=8),
      mesh=dict(shape=(1, -1, 1)),
  )))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """`config.model` for every variant; `config.train` (the official recipe) for b18 and b36 only.

  `main` is the complete quick-start training config (model tiny; data, train, checkpoint, log).
  """
  variant = arg or "tiny"
  if variant == "main":
    return main_job_config()
  config = ml_collections.ConfigDict()
  config.model = model_config(variant)
  if variant in ("b18", "b36"):
    config.train = official_train_config()
  return config
