"""Reconstruction and code-usage metrics (pure functions over batches)."""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np


def to_unit_range(images: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1], the range PSNR and SSIM are reported in."""
  return jnp.clip((images + 1) / 2, 0, 1)


def psnr_ssim(originals: jax.Array, reconstructions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[B, H, W, C] in [-1, 1] -> per-image PSNR (dB) and SSIM, each [B]."""
  if originals.shape != reconstructions.shape:
    raise ValueError(f"shape mismatch: {originals.shape} vs {reconstructions.shape}")
  a, b = to_unit_range(originals), to_unit_range(reconstructions)
  return dm_pix.psnr(a, b), dm_pix.ssim(a, b)


def code_statistics(codes: np.ndarray, codebook_size: float) -> dict[str, float | list[float]]:
  """Statistics of integer codes [..., D] (one non-negative digit per channel).

  per_dim_entropy: empirical entropy (bits) of each channel's digit (for binary codes, per-bit entropy);
  unique_codes: distinct code vectors seen; code_usage: unique_codes / min(number of codes, codebook_size).
  """
  codes = np.asarray(codes).reshape(-1, np.shape(codes)[-1]).astype(np.int64)
  num, dims = codes.shape
  entropy = []
  for d in range(dims):
    p = np.bincount(codes[:, d]) / num
    p = p[p > 0]
    entropy.append(float(-(p * np.log2(p)).sum()))
  unique = len(np.unique(codes, axis=0))
  return {
      "per_dim_entropy": entropy,
      "mean_dim_entropy": float(np.mean(entropy)),
      "unique_codes": unique,
      "code_usage": unique / min(num, codebook_size),
  }
