"""Infinity's multi-scale residual BSQ (official `MultiScaleBSQ` + `BSQ`, `new_quant=True`), NHWC.

For latents z [B, H, W, d] and scale grids (h_k, w_k), k = 0..K-1, ending at (H, W):

    residual = z
    for k:
      r_k = area_resize(residual, (h_k, w_k))          # skipped at full size
      u_k = l2_normalize(r_k over d)
      q_k = u_k + stop_gradient(sign(u_k) / sqrt(d) - u_k)   # identity straight-through
      bits_k = q_k > 0                                 # sign(0) -> bit 0
      Q_k = bilinear_resize(q_k, (H, W))               # 'trilinear' with t = 1, half-pixel centres
      residual -= stop_gradient(Q_k);  quantized += Q_k

Bit c of a token is latent channel c; were an integer index ever formed, channel 0 would be its MSB
(`bitgen.quantizers.bits`, order "msb"). Per-scale bits concatenate scale-major, row-major within a
scale, into (B, L, d): the Infinity transformer's label layout.

Resizes are PyTorch's `F.interpolate` (mode 'area' = adaptive average pooling; 'trilinear' with
align_corners=False and t = 1 = bilinear with half-pixel centres, clamped at the border), applied as
separable matrices built in float32 like PyTorch's weights, at HIGHEST matmul precision: the bit
labels depend on signs that can sit within 1e-5 of zero.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.quantizers import bits as bits_lib
from bitgen.quantizers import bsq
from bitgen.quantizers import ops
from bitgen.quantizers import stats
from bitgen.quantizers.base import QuantizerOutput

Grid = tuple[int, int]


@functools.cache
def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(out, in) weights of adaptive average pooling (PyTorch's start/end index rule)."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -(-((i + 1) * size_in) // size_out)
    m[i, start:end] = np.float32(1.0) / np.float32(end - start)
  return m


@functools.cache
def _linear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(out, in) weights of linear interpolation, align_corners=False, in float32 as PyTorch."""
  m = np.zeros((size_out, size_in), np.float32)
  scale = np.float32(size_in) / np.float32(size_out)
  for i in range(size_out):
    src = max(scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = int(src)
    i1 = i0 + 1 if i0 < size_in - 1 else i0
    lam1 = np.float32(src - np.float32(i0))
    m[i, i0] += np.float32(1.0) - lam1
    m[i, i1] += lam1
  return m


def _resize(x: jax.Array, grid: Grid, matrix_fn) -> jax.Array:
  """[B, H, W, d] -> [B, h, w, d] with separable (out, in) matrices; identity at the same size."""
  h_in, w_in = x.shape[-3], x.shape[-2]
  h, w = grid
  if (h, w) == (h_in, w_in):
    return x
  mh = jnp.asarray(matrix_fn(h_in, h), x.dtype)
  mw = jnp.asarray(matrix_fn(w_in, w), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  # [B, h, W, d]
  x = jnp.einsum("ih,...hwd->...iwd", mh, x, precision=hi)
  # [B, h, w, d]
  return jnp.einsum("jw,...iwd->...ijd", mw, x, precision=hi)


def area_resize(x: jax.Array, grid: Grid) -> jax.Array:
  """PyTorch `F.interpolate(mode='area')` on NHWC."""
  return _resize(x, grid, _area_matrix)


def bilinear_resize(x: jax.Array, grid: Grid) -> jax.Array:
  """PyTorch `F.interpolate(mode='trilinear'/'bilinear', align_corners=False)` on NHWC (t = 1)."""
  return _resize(x, grid, _linear_matrix)


def code_scale(num_bits: int) -> float:
  return 1.0 / math.sqrt(num_bits)


def quantize_scale(residual: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One BSQ step on [..., d]: (u = l2-normalised input, q = +-1/sqrt(d) with identity STE, bits)."""
  u = ops.l2_normalize(residual)
  q = ops.straight_through(u, ops.sign_values(u) * np.float32(code_scale(u.shape[-1])))
  return u, q, bits_lib.signs_to_bits(q)


def bits_to_codes(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
  """[..., d] bits -> unit-norm codes +-1/sqrt(d) (official `indices_to_codes(.., 'bit_label')`)."""
  s = np.float32(code_scale(bits.shape[-1]))
  return ops.l2_normalize(bits.astype(dtype) * s * 2 - s)


def check_grids(grids: Sequence[Grid], latent_hw: Grid, who: str) -> tuple[Grid, ...]:
  grids = tuple(tuple(int(v) for v in g) for g in grids)
  if not grids or any(len(g) != 2 or min(g) < 1 for g in grids):
    raise ValueError(f"{who}: scale grids must be a non-empty list of (h, w) >= 1, got {grids}")
  if grids[-1] != tuple(latent_hw):
    raise ValueError(
        f"{who}: the scale schedule ends at {grids[-1]} but the latents are {tuple(latent_hw)}; "
        "the last scale must be the full latent grid")
  return grids


def split_scales(tokens: jax.Array, grids: Sequence[Grid]) -> list[jax.Array]:
  """(B, L, d) concatenated scales -> per scale [B, h_k, w_k, d]."""
  out, start = [], 0
  for h, w in grids:
    out.append(tokens[:, start:start + h * w].reshape(tokens.shape[0], h, w, tokens.shape[-1]))
    start += h * w
  if start != tokens.shape[1]:
    raise ValueError(f"{tokens.shape[1]} tokens do not match the schedule's {start}")
  return out


def concat_scales(per_scale: Sequence[jax.Array]) -> jax.Array:
  """per scale [B, h_k, w_k, d] -> (B, L, d), scale-major, row-major within a scale."""
  return jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in per_scale], axis=1)


def multiscale_quantize(
    z: jax.Array,
    grids: Sequence[Grid],
    *,
    commitment_weight: float = 0.25,
    entropy_weight: float = 0.1,
    inv_temperature: float = 100.0,
    gamma0: float = 1.0,
    gamma: float = 1.0,
    zeta: float = 1.0,
) -> QuantizerOutput:
  """z [B, H, W, d] -> quantized [B, H, W, d] (sum of upsampled codes), codes (B, L, d) bits.

  loss: BitVAE's quantizer terms per scale, averaged over scales (the release computes none):
  commitment_weight * mean ||stop_gradient(q) - u||^2 + entropy_weight * zeta *
  (gamma0 * H_persample - gamma * H_codebook) / inv_temperature, with BSQ's analytic soft entropy.
  """
  ops.check_last_dim(z, z.shape[-1], "multiscale_quantize")
  grids = check_grids(grids, z.shape[-3:-1], "multiscale_quantize")
  num_bits = z.shape[-1]
  entropy_config = bsq.BSQConfig(num_bits=num_bits, group_size=1, persample_entropy="analytical",
                                 inv_temperature=inv_temperature, gamma0=gamma0, gamma=gamma, zeta=zeta)
  residual, quantized = z, jnp.zeros_like(z)
  bits_per_scale, losses, commitments, entropies = [], [], [], []
  for grid in grids:
    u, q, bits = quantize_scale(area_resize(residual, grid))
    upsampled = bilinear_resize(q, z.shape[-3:-1])
    residual = residual - jax.lax.stop_gradient(upsampled)
    quantized = quantized + upsampled
    bits_per_scale.append(bits)
    commitment = jnp.mean(jnp.sum(jnp.square(jax.lax.stop_gradient(q) - u), axis=-1))
    persample, codebook, _ = bsq.soft_entropy(u, entropy_config)
    entropy_penalty = gamma0 * persample - gamma * codebook
    losses.append(commitment_weight * commitment + entropy_weight * zeta * entropy_penalty / inv_temperature)
    commitments.append(commitment)
    entropies.append(entropy_penalty)
  codes = concat_scales(bits_per_scale)
  metrics = dict(stats.usage_metrics(codes))
  metrics.update(commitment=jnp.mean(jnp.stack(commitments)),
                 entropy_penalty=jnp.mean(jnp.stack(entropies)))
  metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
  return QuantizerOutput(quantized=quantized, codes=codes, indices=None,
                         loss=jnp.mean(jnp.stack(losses)), metrics=metrics)


def codes_from_bits(bits_per_scale: Sequence[jax.Array], latent_hw: Grid) -> jax.Array:
  """Generation-time decode path: sum over scales of upsampled `bits_to_codes` -> [B, H, W, d]."""
  total = None
  for bits in bits_per_scale:
    up = bilinear_resize(bits_to_codes(bits), latent_hw)
    total = up if total is None else total + up
  return total


def next_scale_input(summed_codes: jax.Array, grid: Grid) -> jax.Array:
  """Transformer input of the next scale: bilinear resize of the running code sum -> (B, h*w, d)."""
  x = bilinear_resize(summed_codes, grid)
  return x.reshape(x.shape[0], -1, x.shape[-1])


def patchify(x: jax.Array) -> jax.Array:
  """[B, 2h, 2w, C] -> [B, h, w, 4C], channel c * 4 + 2i + j (PyTorch `pixel_unshuffle(x, 2)`)."""
  b, h2, w2, c = x.shape
  if h2 % 2 or w2 % 2:
    raise ValueError(f"patchify needs an even grid, got {h2}x{w2}")
  x = x.reshape(b, h2 // 2, 2, w2 // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h2 // 2, w2 // 2, 4 * c)


def unpatchify(x: jax.Array) -> jax.Array:
  """Inverse of `patchify` (PyTorch `pixel_shuffle(x, 2)`): [B, h, w, 4C] -> [B, 2h, 2w, C]."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)
