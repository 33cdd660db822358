"""Images <-> patch tokens, with the channel-major flatten order of BSQ-ViT / MAGVIT ViTs.

A patch token holds its pixels flattened as (channel, row in patch, column in patch), i.e. feature
index `c * p * p + sh * p + sw` (einops `b c (hh sh) (ww sw) -> b (hh ww) (c sh sw)` on NCHW);
tokens are in row-major patch order (hh, ww). Images are NHWC.
"""

import jax


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p) * (W/p), C * p * p]."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"patch size {p} does not divide the image size {h}x{w}")
  # [B, hh, sh, ww, sw, C] -> [B, hh, ww, C, sh, sw]
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jax.Array, patch_size: int, grid: tuple[int, int], channels: int) -> jax.Array:
  """[B, hh * ww, C * p * p] -> [B, hh * p, ww * p, C]; the inverse of `patchify`."""
  b, t, f = tokens.shape
  p = patch_size
  hh, ww = grid
  if t != hh * ww or f != channels * p * p:
    raise ValueError(
        f"tokens of shape {tuple(tokens.shape)} do not fit a {hh}x{ww} grid of {channels}-channel "
        f"{p}x{p} patches")
  # [B, hh, ww, C, sh, sw] -> [B, hh, sh, ww, sw, C]
  x = tokens.reshape(b, hh, ww, channels, p, p).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, hh * p, ww * p, channels)
