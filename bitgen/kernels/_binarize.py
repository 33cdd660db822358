"""1-bit Q/K quantisation shared by the binary attention kernels (BinaryAttention's convention).

x_hat = s * sign(x) with s = mean|x| and sign(0) = +1 (also for -0.0). Trained with a clipped
straight-through estimator: d sign(x)/dx := 1 where |x| <= 1, else 0. The scale is NOT detached, so
d x_hat / dx = s * 1[|x| <= 1] + d|x|/dx / count * sum(g * sign(x)), with d|x|/dx = 0 at x = 0 as in
torch (jax's `abs` gives 1 there): this is the gradient the official fixture pins.

Packing: `pack_signs` stores sign bits as uint32 words through `bitgen.quantizers.bits.pack_bits`
with order "lsb" (element d of the head dim is bit d % 32 of word d // 32, so a kernel unpacks with
`(word >> (d % 32)) & 1`). NOTE the bit differs from `bits.signs_to_bits` at exactly 0: there bit = 1
where x > 0 (sign(0) = -1, BSQ/LFQ); here bit = 1 where x >= 0 (sign(0) = +1, BinaryAttention).
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bitgen.quantizers import bits as bits_lib

# Finite, so a tile whose row is fully masked gives exp(mask - max) = 0 instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

ScaleMode = Literal["per_head", "per_token"]
SCALE_MODES = ("per_head", "per_token")
PACK_ORDER = "lsb"


def binary_sign(x: jax.Array) -> jax.Array:
  """{-1, +1} in x's dtype with sign(0) = sign(-0.0) = +1 (no gradient: see `ste_sign`)."""
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@jax.custom_vjp
def ste_sign(x: jax.Array) -> jax.Array:
  """binary_sign with the clipped straight-through gradient 1[|x| <= 1]."""
  return binary_sign(x)


def _ste_sign_fwd(x):
  return binary_sign(x), x


def _ste_sign_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def sign_scale(x: jax.Array, scale_mode: ScaleMode) -> jax.Array:
  """s = mean|x| in float32 for x: [B, T, N, H]: [B, 1, N, 1] per_head, [B, T, N, 1] per_token."""
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
  per_token = jnp.mean(_abs_torch_grad(x.astype(jnp.float32)), axis=3, keepdims=True)
  if scale_mode == "per_token":
    return per_token
  # Mean of the per-token means (equal counts): two reductions over adjacent axes, as XLA's GPU
  # reduction over axes (1, 3) at once took ~0.09 ms at [4, 4096, 16, 64] on an H100.
  return jnp.mean(per_token, axis=1, keepdims=True)


def _abs_torch_grad(x: jax.Array) -> jax.Array:
  """|x| whose derivative is sign(x), 0 at x = 0 (torch's; jax's abs has derivative 1 at 0)."""
  return x * lax.stop_gradient(jnp.sign(x))


def binarize(x: jax.Array, scale_mode: ScaleMode) -> tuple[jax.Array, jax.Array]:
  """x: [B, T, N, H] -> (signs in x.dtype with the STE gradient, float32 scale), x_hat = s * signs."""
  return ste_sign(x), sign_scale(x, scale_mode)


def pack_signs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., H) real -> (uint32 words (..., ceil(H/32)), float32 scale (...,) = mean|x| over H).

  The per-vector scale is what a growing key cache needs (each token is packed once, on arrival).
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"pack_signs takes floating-point values, got {x.dtype}")
  words = bits_lib.pack_bits((x >= 0).astype(jnp.uint8), order=PACK_ORDER)
  return words, jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=-1)


def unpack_signs(words: jax.Array, num_bits: int, dtype=jnp.float32) -> jax.Array:
  """(..., ceil(num_bits/32)) uint32 -> (..., num_bits) {-1, +1} in `dtype` (inverse of pack_signs)."""
  return bits_lib.bits_to_signs(bits_lib.unpack_bits(words, num_bits, order=PACK_ORDER), dtype)


def kernel_factors(q_scale, k_scale, batch, q_len, kv_len, heads, head_dim):
  """Row factor s_q / sqrt(H) as [B, N, T] and column factor s_k as [B, N, S], float32."""
  row = jnp.broadcast_to(q_scale[..., 0], (batch, q_len, heads)) / math.sqrt(head_dim)
  col = jnp.broadcast_to(k_scale[..., 0], (batch, kv_len, heads))
  return jnp.transpose(row, (0, 2, 1)), jnp.transpose(col, (0, 2, 1))
