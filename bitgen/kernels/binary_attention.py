"""Binary (1-bit Q/K) attention for training and prefill: the API, the reference, and the dispatch
to the Pallas kernels (`binary_attention_gpu`, `binary_attention_tpu`).

BinaryAttention (EdwardChasel/BinaryAttention) math, layout [B, T, N, H] as `bitgen.nn.attention`:

  q_hat = s_q sign(q), k_hat = s_k sign(k), s = mean|x|, sign(0) = +1
  out = softmax(q_hat k_hat^T / sqrt(H) + bias, masked) v

The +-1 dot products are exact small integers, so the kernels compute them on the matrix units in
8 bits (TPU MXU int8; Hopper wgmma fp8 e4m3 with f32 accumulators, or s8 -> s32) and apply the
scales s_q s_k / sqrt(H) as a rank-1 factor (row factor x column factor) before an f32 softmax
(online max; on GPU the static bound |S| <= H replaces it where exp2 cannot underflow). The quantisation (sign, scale and the
clipped straight-through gradient, `_binarize`) runs in XLA around the kernel; the kernel sits
inside a `custom_vjp` whose backward is the reference math (exact, it recomputes the dense scores).

Masks: None; "causal" (key j <= query i, T == S); integer segment ids [T] or [B, T] for
block-causal attention (query i sees key j iff seg[j] <= seg[i]: Infinity's "all earlier scales and
your own" with seg = scale index); or a boolean array broadcastable to [B, N, T, S] (reference only).

implementation: "auto" runs the Pallas kernel of the backend it runs on (GPU: Mosaic GPU, TPU:
Mosaic TPU) and the reference elsewhere, or where the kernel cannot take the inputs (logged, never
wrong numbers); "reference" always the reference; "pallas_tpu" / "pallas_gpu" force a kernel (an
unsupported input raises); "pallas_tpu" off a TPU runs in the Pallas TPU interpreter (how CPU
tests check its numerics), "pallas_gpu" needs a CUDA GPU (Hopper: wgmma).
"""

import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from bitgen.kernels import binary_attention_gpu, binary_attention_tpu
from bitgen.kernels._binarize import (MASK_VALUE, SCALE_MODES, ScaleMode, binarize, pack_signs,
                                      unpack_signs)

__all__ = ["binary_attention", "binary_attention_reference", "pack_signs", "unpack_signs",
           "Implementation"]

Implementation = Literal["auto", "reference", "pallas_gpu", "pallas_tpu"]
IMPLEMENTATIONS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
KERNEL_HEAD_DIMS = (64, 128)
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Mask:
  """Normalised mask: `segments` [B, T] / [B, S] int32 (block-causal, causal = arange), or dense."""
  q_segments: jax.Array | None = None
  k_segments: jax.Array | None = None
  dense: jax.Array | None = None
  causal: bool = False


def _normalize_mask(mask, batch: int, q_len: int, kv_len: int) -> _Mask:
  if mask is None:
    return _Mask()
  if isinstance(mask, str):
    if mask != "causal":
      raise ValueError(f"mask string must be 'causal', got {mask!r}")
    if q_len != kv_len:
      raise ValueError(f"causal mask needs equal query and key lengths, got T={q_len}, S={kv_len}")
    seg = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    return _Mask(q_segments=seg, k_segments=seg, causal=True)
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    if mask.ndim > 4:
      raise ValueError(f"boolean mask must broadcast to [B, N, T, S], got shape {mask.shape}")
    return _Mask(dense=mask)
  if jnp.issubdtype(mask.dtype, jnp.integer):
    if q_len != kv_len:
      raise ValueError(f"segment ids need equal query and key lengths, got T={q_len}, S={kv_len}")
    if mask.shape not in ((q_len,), (batch, q_len)):
      raise ValueError(f"segment ids must have shape [T] or [B, T] = [{batch}, {q_len}], "
                       f"got {mask.shape}")
    seg = jnp.broadcast_to(mask.astype(jnp.int32), (batch, q_len))
    return _Mask(q_segments=seg, k_segments=seg)
  raise TypeError(f"mask must be None, 'causal', integer segment ids or a boolean array, "
                  f"got dtype {mask.dtype}")


# ----------------------------------------------------------------------------------------------
# Reference.


def _attend_reference(q_sign, q_scale, k_sign, k_scale, v, bias, mask: _Mask):
  """The factored math every implementation matches; f32 softmax, output in v.dtype."""
  head_dim = q_sign.shape[-1]
  # [B, N, T, S]: exact integers (|dot| <= H) in every matmul precision.
  dots = jnp.einsum("btnh,bsnh->bnts", q_sign, k_sign, preferred_element_type=jnp.float32)
  row = jnp.transpose(q_scale, (0, 2, 1, 3)) / math.sqrt(head_dim)  # [B, N, T|1, 1]
  col = jnp.transpose(k_scale, (0, 2, 3, 1))  # [B, N, 1, S|1]
  logits = dots * row * col
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  allowed = None
  if mask.q_segments is not None:
    allowed = (mask.k_segments[:, None, None, :] <= mask.q_segments[:, None, :, None])
  if mask.dense is not None:
    allowed = mask.dense
  if allowed is not None:
    logits = jnp.where(allowed, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  # [B, T, N, H]
  out = jnp.einsum("bnts,bsnh->btnh", probs, v.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.astype(v.dtype)


def binary_attention_reference(q, k, v, *, bias=None, mask=None, scale_mode: ScaleMode = "per_head"):
  """Pure-JAX binary attention (plain autodiff, no custom_vjp): the definition the kernels match."""
  _check_inputs(q, k, v, scale_mode)
  q_sign, q_scale = binarize(q, scale_mode)
  k_sign, k_scale = binarize(k, scale_mode)
  m = _normalize_mask(mask, q.shape[0], q.shape[1], k.shape[1])
  return _attend_reference(q_sign, q_scale, k_sign, k_scale, v, bias, m)


def _check_inputs(q, k, v, scale_mode):
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, N, H], got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q [B, T, N, H] and k, v [B, S, N, H] disagree: {q.shape}, {k.shape}, "
                     f"{v.shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")


# ----------------------------------------------------------------------------------------------
# Public entry point and its custom_vjp.


def binary_attention(q, k, v, *, bias=None, mask=None, scale_mode: ScaleMode = "per_head",
                     implementation: Implementation = "auto"):
  """Binary Q/K attention. q: [B, T, N, H], k/v: [B, S, N, H], bias: broadcastable to [B, N, T, S].

  Returns [B, T, N, H] in v.dtype. Gradients flow to q, k (clipped STE + scale path), v and bias.
  """
  _check_inputs(q, k, v, scale_mode)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  m = _normalize_mask(mask, q.shape[0], q.shape[1], k.shape[1])
  kernel = _pick_kernel(implementation, q, k, v, bias, m)
  q_sign, q_scale = binarize(q, scale_mode)
  k_sign, k_scale = binarize(k, scale_mode)
  if kernel is None:
    return _attend_reference(q_sign, q_scale, k_sign, k_scale, v, bias, m)
  return _attend_kernel(kernel, m.causal, q_sign, q_scale, k_sign, k_scale, v, m.q_segments)


def _pick_kernel(implementation, q, k, v, bias, mask: _Mask):
  """The kernel function to run, or None for the reference."""
  if implementation == "reference":
    return None
  backend = jax.default_backend()
  if implementation == "auto":
    name = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)
    if name is None:
      return None
  else:
    name = implementation
  reason = _unsupported_reason(name, q, k, v, bias, mask)
  if reason is not None:
    if implementation == "auto":
      _log.warning("binary_attention: %s kernel cannot take these inputs (%s); using the reference",
                   name, reason)
      return None
    raise ValueError(f"binary_attention implementation={name!r} cannot take these inputs: {reason}")
  if name == "pallas_tpu":
    return functools.partial(binary_attention_tpu.binary_attention_tpu, interpret=backend != "tpu")
  return binary_attention_gpu.binary_attention_gpu


def _unsupported_reason(name, q, k, v, bias, mask: _Mask) -> str | None:
  head_dim = q.shape[-1]
  if head_dim not in KERNEL_HEAD_DIMS:
    return f"head dim {head_dim} not in {KERNEL_HEAD_DIMS}"
  if bias is not None:
    return "an additive bias (the kernels take none)"
  if mask.dense is not None:
    return "a dense boolean mask (kernels take None, 'causal' or segment ids)"
  if name == "pallas_gpu":
    if jax.default_backend() not in ("gpu", "cuda"):
      return "the Mosaic GPU kernel needs a CUDA GPU (no interpreter for it here)"
    return binary_attention_gpu.unsupported_reason(q, k, v)
  return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend_kernel(kernel, causal, q_sign, q_scale, k_sign, k_scale, v, segments):
  return kernel(q_sign, q_scale, k_sign, k_scale, v, segments, causal=causal)


def _attend_kernel_fwd(kernel, causal, q_sign, q_scale, k_sign, k_scale, v, segments):
  out = kernel(q_sign, q_scale, k_sign, k_scale, v, segments, causal=causal)
  return out, (q_sign, q_scale, k_sign, k_scale, v, segments)


def _attend_kernel_bwd(kernel, causal, residuals, g):
  del kernel, causal
  q_sign, q_scale, k_sign, k_scale, v, segments = residuals
  mask = _Mask(q_segments=segments, k_segments=segments)
  _, vjp = jax.vjp(lambda *a: _attend_reference(*a, None, mask),
                   q_sign, q_scale, k_sign, k_scale, v)
  return (*vjp(g), None)


_attend_kernel.defvjp(_attend_kernel_fwd, _attend_kernel_bwd)
