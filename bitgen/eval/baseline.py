"""A same-bit-budget baseline for tokenizers: area-downsample, quantize colours, upsample back.

A tokenizer spending `bits_per_token` bits on each `patch x patch` block is compared with storing,
for the same block, its mean colour with `bits_per_token / 3` bits per channel (a patch^2-fold area
downsample of the image), decoded by bilinear upsampling.
"""

import jax
import jax.numpy as jnp


def area_downsample_baseline(images: jax.Array, *, patch: int, bits_per_token: int) -> jax.Array:
  """[B, H, W, 3] in [-1, 1] -> reconstruction from `bits_per_token` bits per `patch`^2 block."""
  b, h, w, c = images.shape
  if c != 3 or h % patch or w % patch:
    raise ValueError(f"baseline needs [B, H, W, 3] with H, W divisible by {patch}, got {images.shape}")
  if bits_per_token % 3:
    raise ValueError(f"bits_per_token must split evenly over 3 channels, got {bits_per_token}")
  levels = 2 ** (bits_per_token // 3)
  # [B, H/p, W/p, 3]
  means = images.reshape(b, h // patch, patch, w // patch, patch, c).mean(axis=(2, 4))
  unit = (means + 1) / 2
  quantized = jnp.round(jnp.clip(unit, 0, 1) * (levels - 1)) / (levels - 1) * 2 - 1
  return jnp.clip(jax.image.resize(quantized, images.shape, method="linear"), -1, 1)
