"""Binary Latent Diffusion: Bernoulli autoencoder + binary diffusion prior.

`get_config(arg)` with arg in:
  c32, c64, c128  the released-style models at 256^2: 16x16 latents with 32 / 64 / 128 bits per
                  position (C64 and C128 are the released LAION autoencoders; C128 was fine-tuned
                  with a 3x deeper decoder, `--gen_mul 3`), and the released 24-layer denoiser
                  (churches: 768 wide, 12 heads, T = 64, linear schedule, p_flip, loss mean).
  tiny            the parity-fixture sizes (32^2 images, 8x8x32 bits, 2-layer 64-wide denoiser,
                  10 classes, T = 16): seconds on a CPU.
  photos_ae       training config (`bitgen.train` layout, task "bld_autoencoder"): the tiny
                  autoencoder on 32^2 crops of the embedded photos, L1 loss; minutes on a 2-core CPU.
  photos_prior    training config (task "bld_prior"): a class-conditional (one class per photo,
                  label dropout 0.1 for guidance) 4-layer 128-wide denoiser, T = 64, on the bits of
                  the frozen photos_ae autoencoder. `bitgen.train.bld.train_bld(get_config(
                  "photos_ae"), get_config("photos_prior"), workdir)` trains both and evaluates.
                  `diffusion.loss_type="plain"` (a likelihood loss) gives a far better NLL bound
                  than the official balanced loss (bitgen/bench/RESULTS_bld.md).
  photos          both stages in one config (task "bld"): `ae` = photos_ae, `prior` = photos_prior.
                  `bitgen train --config bld:photos --workdir W` trains both (`train_bld`) and
                  writes W/report.json; `bitgen sample --config bld:photos --workdir W --out g.png
                  --steps 16` draws a grid. Overrides address a stage: `--set prior.train.steps=100`.

`autoencoder` fills `bitgen.models.bld_autoencoder.Config`, `denoiser` fills
`bitgen.models.bld_denoiser.Config`, `diffusion` and `sample` are the keyword arguments of
`bitgen.sample.binary_diffusion` (schedule, loss, sampler).
"""

import ml_collections

_BITS = {"c32": 32, "c64": 64, "c128": 128}
_TRAINING = ("photos_ae", "photos_prior")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = (arg or "c64").lower()
  if variant not in (*_BITS, "tiny", *_TRAINING, "photos"):
    raise ValueError(
        f"unknown bld variant {arg!r}; expected one of {[*_BITS, 'tiny', *_TRAINING, 'photos']}")
  if variant == "photos":
    return ml_collections.ConfigDict(dict(
        variant=variant, task="bld", ae=_photos_training_config("photos_ae"),
        prior=_photos_training_config("photos_prior")))
  if variant in _TRAINING:
    return _photos_training_config(variant)
  config = ml_collections.ConfigDict()
  config.variant = variant

  if variant == "tiny":
    num_bits, latent, total_steps = 32, 8, 16
    config.autoencoder = dict(
        image_size=32, in_channels=3, base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2,
        attn_resolutions=(8,), emb_dim=64, num_bits=num_bits, decoder_res_mult=1.0,
        norm_first=True, code_weight=0.0)
    config.denoiser = dict(
        num_bits=num_bits, latent_size=latent, width=64, heads=2, depth=2, num_classes=10,
        time_scale_steps=total_steps)
  else:
    num_bits, latent, total_steps = _BITS[variant], 16, 64
    config.autoencoder = dict(
        image_size=256, in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2, attn_resolutions=(16,), emb_dim=256, num_bits=num_bits,
        decoder_res_mult=3.0 if variant == "c128" else 1.0, norm_first=True, code_weight=0.0)
    config.denoiser = dict(
        num_bits=num_bits, latent_size=latent, width=768, heads=12, depth=24, num_classes=0,
        time_scale_steps=total_steps)

  config.diffusion = dict(
      total_steps=total_steps,
      beta_type="linear",      # linear | cos | sigmoid
      p_flip=True,             # the denoiser predicts whether each bit of x_t is flipped
      loss_type="balanced",    # balanced (official focal, class-balanced on x0 xor x_t) | plain
      focal_gamma=0.0,
      loss_final="mean",       # mean | weighted (1 - (t-1)/T)
  )
  # spacing: "linspace" (official, any steps <= T) or "even" (equal strides: (T-1) % (steps-1) == 0).
  config.sample = dict(steps=16, temperature=0.9, guidance=0.0, spacing="linspace")
  return config


def _photos_training_config(variant: str) -> ml_collections.ConfigDict:
  """AE then prior on 32^2 crops of the embedded photos (labels = photo ids, 10 classes)."""
  tiny = get_config("tiny")
  total_steps = 64
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.autoencoder = tiny.autoencoder
  config.data = dict(name="embedded_photos", image_size=tiny.autoencoder.image_size,
                     data_dir=None, eval_grid=8, read_threads=2)
  config.mesh = dict(devices=1)
  config.checkpoint = dict(every=500, keep=1, async_save=False)
  config.log = dict(every=50, grid_every=0, progress=False)
  if variant == "photos_ae":
    config.task = "bld_autoencoder"
    config.model = config.autoencoder
    # The official AE objective: L1 (+ perceptual_weight LPIPS with user-supplied weights) + the
    # model's code_weight * codebook loss; the GAN term is not ported.
    config.train = dict(batch_size=16, steps=600, lr=1e-3, warmup_steps=50, ema_decay=None,
                        weight_decay=0.0, loss=dict(perceptual_weight=0.0))
    return config
  config.task = "bld_prior"
  config.model = dict(
      num_bits=tiny.denoiser.num_bits, latent_size=tiny.denoiser.latent_size, width=128, heads=4,
      depth=4, num_classes=10, time_scale_steps=total_steps)
  config.diffusion = dict(tiny.diffusion, total_steps=total_steps)
  config.sample = dict(tiny.sample, guidance=1.0)
  # label_dropout: each sample's class token is dropped with this probability (guidance training);
  # ae_bits: "sample" draws the training bits ~ Bernoulli(p) as the official prior training does
  # (its autoencoder runs with deterministic=False), "threshold" uses p > 0.5.
  config.prior = dict(label_dropout=0.1, ae_bits="sample")
  config.train = dict(batch_size=32, steps=800, lr=1e-3, warmup_steps=50, ema_decay=None,
                      weight_decay=0.0, b2=0.95)
  return config
