"""Binary Latent Diffusion: Bernoulli autoencoder + binary diffusion prior.

`get_config(arg)` with arg in:
  c32, c64, c128  the released-style models at 256^2: 16x16 latents with 32 / 64 / 128 bits per
                  position (C64 and C128 are the released LAION autoencoders; C128 was fine-tuned
                  with a 3x deeper decoder, `--gen_mul 3`), and the released 24-layer denoiser
                  (churches: 768 wide, 12 heads, T = 64, linear schedule, p_flip, loss mean).
  tiny            the parity-fixture sizes (32^2 images, 8x8x32 bits, 2-layer 64-wide denoiser,
                  10 classes, T = 16): seconds on a CPU.

`autoencoder` fills `bitgen.models.bld_autoencoder.Config`, `denoiser` fills
`bitgen.models.bld_denoiser.Config`, `diffusion` and `sample` are the keyword arguments of
`bitgen.sample.binary_diffusion` (schedule, loss, sampler).
"""

import ml_collections

_BITS = {"c32": 32, "c64": 64, "c128": 128}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = (arg or "c64").lower()
  if variant not in (*_BITS, "tiny"):
    raise ValueError(f"unknown bld variant {arg!r}; expected one of {[*_BITS, 'tiny']}")
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
  config.sample = dict(steps=16, temperature=0.9, guidance=0.0)
  return config
