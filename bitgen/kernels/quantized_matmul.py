"""Quantized matmul: int8 activations x (int8 | packed ternary) weights -> int32, then scales.

    out[m, n] = (sum_k x[m, k] * w[n, k]) * x_scale[m] * w_scale[n]

- `x`: int8 `(..., K)`, one row per token; `x_scale`: float `(...)`, per token (absmax scales).
- `w`: int8 `(N, K)`, or ternary packed as uint32 `(N, K // 16)` (see `ternary_pack`); the dtype
  tells which. `w_scale`: float `(N,)` per output channel or `()` per tensor.
- With `scales=None` the result is the exact int32 accumulator (no scaling).

Implementations: "reference" (pure JAX, exact integer dot), "gpu" (Pallas, Mosaic GPU: Hopper
wgmma), "tpu" (Pallas, Mosaic TPU, int8 on the MXU), and "auto": the kernel of the default backend
where it supports the shapes, else the reference (the reason is logged). Every path gives the same integers;
scaled outputs differ only by the float rounding of the epilogue.

Ternary kernels unpack the 2-bit two's complement codes in registers (shifts and masks) and feed
the int8 MMA / MXU. The packed layout (`ternary_pack`) is the GPU's: a masked register is 4
consecutive values of K in the wgmma's operand layout, so its activations need no reordering; the TPU kernel, which unpacks
whole 32-bit words, takes x's columns in a fixed permutation (one XLA transpose of x a call). Measured numbers: bitgen/bench/RESULTS_quantized_matmul.md.
"""

import logging
from typing import Literal

import jax
import jax.numpy as jnp

from bitgen.kernels import ternary_pack

Implementation = Literal["auto", "reference", "gpu", "tpu"]
_log = logging.getLogger(__name__)


def _validate(x: jax.Array, w: jax.Array, scales, out_dtype):
  """Checks the operands; returns (K, N, ternary, out_dtype)."""
  if x.dtype != jnp.int8:
    raise TypeError(f"x must be int8 (quantize activations first), got {x.dtype}")
  if x.ndim < 1:
    raise ValueError("x must have a K axis last, got a scalar")
  if w.ndim != 2:
    raise ValueError(f"weights must be 2-D (N, K) int8 or (N, K // 16) uint32, got shape {w.shape}")
  if w.dtype == jnp.uint32:
    ternary, k = True, w.shape[1] * ternary_pack.VALUES_PER_WORD
    if x.shape[-1] % ternary_pack.VALUES_PER_WORD:
      raise ValueError(
          f"packed ternary weights need K a multiple of {ternary_pack.VALUES_PER_WORD}, "
          f"got x with K={x.shape[-1]}")
  elif w.dtype == jnp.int8:
    ternary, k = False, w.shape[1]
  else:
    raise TypeError(f"weights must be int8 (N, K) or packed ternary uint32 (N, K // 16), got {w.dtype}")
  if x.shape[-1] != k:
    raise ValueError(f"x has K={x.shape[-1]} but the weights {w.shape} ({w.dtype}) hold K={k}")
  n = w.shape[0]
  if scales is None:
    if out_dtype not in (None, jnp.int32):
      raise ValueError(f"without scales the output is the int32 accumulator, got out_dtype={out_dtype}")
    return k, n, ternary, jnp.dtype(jnp.int32)
  x_scale, w_scale = scales
  if jnp.shape(x_scale) != x.shape[:-1]:
    raise ValueError(f"x_scale must have shape {x.shape[:-1]} (one per token), got {jnp.shape(x_scale)}")
  if jnp.shape(w_scale) not in ((), (n,)):
    raise ValueError(f"w_scale must have shape () or ({n},), got {jnp.shape(w_scale)}")
  out_dtype = jnp.dtype(jnp.bfloat16 if out_dtype is None else out_dtype)
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f"scaled outputs are floating point, got out_dtype={out_dtype}")
  return k, n, ternary, out_dtype


def quantized_matmul_reference(x, w, scales=None, *, out_dtype=None) -> jax.Array:
  """Pure-JAX reference: unpack, exact int8 x int8 -> int32 dot, then the scales."""
  _, n, ternary, out_dtype = _validate(x, w, scales, out_dtype)
  w_int8 = ternary_pack.unpack_ternary(w) if ternary else w
  # [..., K] x [N, K] -> [..., N]
  acc = jax.lax.dot_general(x, w_int8, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  if scales is None:
    return acc
  x_scale, w_scale = scales
  out = acc.astype(jnp.float32) * jnp.asarray(x_scale, jnp.float32)[..., None]
  return (out * jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32), (n,))).astype(out_dtype)


def quantized_matmul(x, w, scales=None, *, out_dtype=None, implementation: Implementation = "auto",
                     interpret: bool = False) -> jax.Array:
  """`x @ w.T` for int8 `x` (..., K) and int8 (N, K) or packed-ternary (N, K // 16) weights.

  Args:
    x: int8 activations, (..., K).
    w: int8 (N, K) or uint32 (N, K // 16) packed ternary weights.
    scales: `(x_scale, w_scale)` with shapes `x.shape[:-1]` and `(N,)` or `()`; None returns the
      exact int32 accumulator.
    out_dtype: float dtype of the scaled output (default bfloat16); int32 (or None) without scales.
    implementation: "auto" | "reference" | "gpu" | "tpu".
    interpret: run a kernel in Pallas interpret mode (tests on CPU).
  Returns:
    (..., N) of `out_dtype`.
  """
  k, n, ternary, out_dtype = _validate(x, w, scales, out_dtype)
  if implementation == "reference":
    return quantized_matmul_reference(x, w, scales, out_dtype=out_dtype)
  if implementation not in ("auto", "gpu", "tpu"):
    raise ValueError(f"unknown implementation {implementation!r}; expected one of {Implementation.__args__}")

  batch_shape = x.shape[:-1]
  m = x.size // k if k else 0
  backend = implementation
  if implementation == "auto":
    backend = jax.default_backend()
  kernel = _kernel_module(backend)
  config = kernel.default_config(m, k, n, ternary) if kernel is not None and m else None
  if kernel is None:
    reason = f"no quantized_matmul kernel for backend {backend!r}"
  else:
    reason = "empty input" if not m else (config if isinstance(config, str) else None)
  if reason is not None:
    if implementation != "auto":
      raise ValueError(f"implementation={implementation!r} cannot run this call: {reason}")
    _log.info("quantized_matmul falls back to the reference: %s", reason)
    return quantized_matmul_reference(x, w, scales, out_dtype=out_dtype)

  x2d = x.reshape(m, k)
  if scales is None:
    x_scale, w_scale = jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32)
  else:
    x_scale = jnp.asarray(scales[0], jnp.float32).reshape(m)
    w_scale = jnp.broadcast_to(jnp.asarray(scales[1], jnp.float32), (n,))
  out = kernel.matmul(x2d, w, x_scale, w_scale, config=config, scaled=scales is not None,
                      out_dtype=out_dtype, interpret=interpret)
  return out.reshape(*batch_shape, n)


def _kernel_module(backend: str):
  if backend in ("gpu", "cuda"):
    from bitgen.kernels import quantized_matmul_gpu
    return quantized_matmul_gpu
  if backend == "tpu":
    from bitgen.kernels import quantized_matmul_tpu
    return quantized_matmul_tpu
  return None

