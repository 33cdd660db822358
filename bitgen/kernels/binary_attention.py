"""Binary (1-bit Q/K) attention for training and prefill: reference, Pallas TPU and GPU kernels.

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
import numpy as np
from jax import lax

from bitgen.kernels._binarize import SCALE_MODES, ScaleMode, binarize, pack_signs, unpack_signs

__all__ = ["binary_attention", "binary_attention_reference", "pack_signs", "unpack_signs",
           "Implementation"]

Implementation = Literal["auto", "reference", "pallas_gpu", "pallas_tpu"]
IMPLEMENTATIONS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
KERNEL_HEAD_DIMS = (64, 128)
# Finite, so a tile whose row is fully masked gives exp(mask - max) = 0 instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
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
    return functools.partial(_tpu_forward, interpret=backend != "tpu")
  return _gpu_forward


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
    return _gpu_unsupported_reason(q, k, v, mask)
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


def _kernel_factors(q_scale, k_scale, batch, q_len, kv_len, heads, head_dim):
  """Row factor s_q / sqrt(H) as [B, N, T] and column factor s_k as [B, N, S], float32."""
  row = jnp.broadcast_to(q_scale[..., 0], (batch, q_len, heads)) / math.sqrt(head_dim)
  col = jnp.broadcast_to(k_scale[..., 0], (batch, kv_len, heads))
  return jnp.transpose(row, (0, 2, 1)), jnp.transpose(col, (0, 2, 1))


# ----------------------------------------------------------------------------------------------
# TPU kernel (Mosaic TPU): flash attention over [B, N, T, H] with int8 +-1 scores on the MXU.


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  block_q: int = 512
  block_kv: int = 512


def _round_up(x, m):
  return -(-x // m) * m


def _tpu_forward(q_sign, q_scale, k_sign, k_scale, v, segments, *, causal,
                 blocks: TpuBlockSizes = TpuBlockSizes(), interpret=False):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  del causal  # causal arrives as segments = arange(T); the block skip below derives from them.
  batch, q_len, heads, head_dim = q_sign.shape
  kv_len = k_sign.shape[1]
  # Blocks: multiples of 128 (int8 sublane tiles are 32, lanes 128), padded sequences.
  block_q = min(blocks.block_q, _round_up(q_len, 128))
  block_kv = min(blocks.block_kv, _round_up(kv_len, 128))
  q_pad, kv_pad = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
  num_q, num_kv = q_pad // block_q, kv_pad // block_kv

  row, col = _kernel_factors(q_scale, k_scale, batch, q_len, kv_len, heads, head_dim)
  # Padded keys get the largest segment id so no real query sees them; padded queries see all.
  big = jnp.iinfo(jnp.int32).max
  if segments is None:
    q_seg = jnp.zeros((batch, q_len), jnp.int32)
    k_seg = jnp.zeros((batch, kv_len), jnp.int32)
  else:
    q_seg, k_seg = segments, segments
  q_seg = jnp.pad(q_seg, ((0, 0), (0, q_pad - q_len)), constant_values=big)
  k_seg = jnp.pad(k_seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=big)
  masked = segments is not None or kv_pad != kv_len
  # Which (q block, kv block) pairs hold any allowed entry: [B, num_q, num_kv], flattened for SMEM.
  q_max = q_seg.reshape(batch, num_q, block_q).max(-1)
  k_min = k_seg.reshape(batch, num_kv, block_kv).min(-1)
  needed = (k_min[:, None, :] <= q_max[:, :, None]).astype(jnp.int32)
  # Skipped blocks re-use the last needed block's index, so their DMA is elided.
  kv_index = jnp.where(needed > 0, jnp.arange(num_kv, dtype=jnp.int32), -1)
  kv_index = jnp.maximum(lax.cummax(kv_index, axis=2), 0).reshape(-1)
  needed = needed.reshape(-1)

  def to_heads_major(x, length, pad_value=0):  # [B, L, N, H] -> [B, N, L_pad, H]
    x = jnp.transpose(x, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)), constant_values=pad_value)

  q_i8 = to_heads_major(q_sign.astype(jnp.int8), q_pad)
  k_i8 = to_heads_major(k_sign.astype(jnp.int8), kv_pad)
  v_t = to_heads_major(v, kv_pad)
  row = jnp.pad(row, ((0, 0), (0, 0), (0, q_pad - q_len)))[..., None]  # [B, N, T_pad, 1]
  col = jnp.pad(col, ((0, 0), (0, 0), (0, kv_pad - kv_len)))[:, :, None, :]  # [B, N, 1, S_pad]
  q_seg = q_seg[:, :, None]  # [B, T_pad, 1]
  k_seg = k_seg[:, None, :]  # [B, 1, S_pad]

  def flat(b, i, j):
    return (b * num_q + i) * num_kv + j

  def kernel(needed_ref, kv_index_ref, q_ref, k_ref, v_ref, row_ref, col_ref, qs_ref, ks_ref,
             o_ref, m_scr, l_scr, acc_scr):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
      m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
      l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(needed_ref[flat(b, i, j)] > 0)
    def _step():
      # 1. +-1 scores, exact in int32: [block_q, block_kv].
      dots = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.int32)
      # 2. logits = dots * s_q / sqrt(H) * s_k, then the block-causal / padding mask.
      s = dots.astype(jnp.float32) * row_ref[...] * col_ref[...]
      if masked:
        s = jnp.where(ks_ref[...] <= qs_ref[...], s, MASK_VALUE)
      # 3. Online softmax in f32 and the P.V accumulation.
      m_prev = m_scr[...]
      m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
      p = jnp.exp(s - m_new)
      alpha = jnp.exp(m_prev - m_new)
      l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
      acc_scr[...] = alpha * acc_scr[...] + jnp.dot(
          p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
      m_scr[...] = m_new

    @pl.when(j == num_kv - 1)
    def _finish():
      o_ref[...] = (acc_scr[...] / l_scr[...]).astype(o_ref.dtype)

  def kv_map(b, n, i, j, needed_ref, kv_index_ref):
    return (b, n, kv_index_ref[flat(b, i, j)], 0)

  squeeze = None
  in_specs = [
      pl.BlockSpec((squeeze, squeeze, block_q, head_dim), lambda b, n, i, j, *_: (b, n, i, 0)),
      pl.BlockSpec((squeeze, squeeze, block_kv, head_dim), kv_map),
      pl.BlockSpec((squeeze, squeeze, block_kv, head_dim), kv_map),
      pl.BlockSpec((squeeze, squeeze, block_q, 1), lambda b, n, i, j, *_: (b, n, i, 0)),
      pl.BlockSpec((squeeze, squeeze, 1, block_kv),
                   lambda b, n, i, j, nr, kr: (b, n, 0, kr[flat(b, i, j)])),
      pl.BlockSpec((squeeze, block_q, 1), lambda b, n, i, j, *_: (b, i, 0)),
      pl.BlockSpec((squeeze, 1, block_kv), lambda b, n, i, j, nr, kr: (b, 0, kr[flat(b, i, j)])),
  ]
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, heads, num_q, num_kv),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((squeeze, squeeze, block_q, head_dim),
                                 lambda b, n, i, j, *_: (b, n, i, 0)),
          scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((batch, heads, q_pad, head_dim), v.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(needed, kv_index, q_i8, k_i8, v_t, row, col, q_seg, k_seg)
  return jnp.transpose(out[:, :, :q_len], (0, 2, 1, 3))


# ----------------------------------------------------------------------------------------------
# GPU kernel (Mosaic GPU, Hopper): warp-specialised flash attention with 8-bit +-1 scores.
#
# One CTA takes 2 * block_q queries of one (batch, head): warpgroups 0 and 1 compute (block_q rows
# each), warpgroup 2 streams K, V (and per-token key scales) into a ring of `max_concurrent_steps`
# shared-memory slots with the bulk-copy engine. Per key block a compute warpgroup runs
#   1. S = sign(q) sign(k)^T on the tensor cores, 8-bit operands at twice the bf16 rate: fp8 e4m3
#      with f32 accumulators (exact: |S| <= H; no int -> float conversion) or s8 -> s32,
#   2. x = S * f - shift in base 2, f = s_q s_k log2(e) / sqrt(H) (one scalar per head for per-head
#      scales, row x column factors per token), then the causal mask,
#   3. p = exp2(x), l += sum(p), O += P V on the tensor cores (P in V's dtype).
# Bounded softmax: |S| <= H bounds every row maximum by shift = H * f (per token: H * f_row *
# max f_col), so the running max, its exp2 rescale of O and l and the row-max reductions drop out.
# Softmax is shift invariant, so this is exact unless exp2 underflows; every p >= 2^-(2 shift), so
# a (batch, head) takes this path only where 2 * shift <= _BOUND_LIMIT[V dtype] (P stays a normal
# number), decided inside the kernel; other heads run the online-max loop.


@dataclasses.dataclass(frozen=True)
class GpuTuning:
  # block_kv 128 beats 64 by ~20% and 3 slots beat 2 (H100, bench --tune); larger tiles were slower.
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 3
  # Ping-pong the two compute warpgroups (one runs its softmax while the other uses the tensor
  # cores), through a 2-arrival rendezvous barrier, as FlashAttention-3 does.
  schedule_barrier: bool = True
  # Measured on H100 (bench --tune, B=4 T=4096 N=16 H=64, kernel only), 2026-11-22: int8 with the
  # online max 0.789 ms, fp8 with the online max 0.680, fp8 bounded (default) 0.588, + 32 polynomial
  # exp2 columns 0.637, + fp8 P V 0.833 (max err 4.3e-3 vs 3.7e-4).
  # Operand type of the +-1 scores: "float8_e4m3fn" (f32 accumulators) or "int8" (s32, converted).
  qk_dtype: str = "float8_e4m3fn"
  # Use the static score bound instead of the running max where it cannot underflow (see above).
  bounded_softmax: bool = True
  # The last `poly_exp_cols` columns of each unmasked key block take exp2 as a polynomial on the FMA
  # pipes instead of the MUFU unit (FlashAttention-4's split), 0 = all on the MUFU. Slower at 32.
  poly_exp_cols: int = 0
  # 8-bit P V (the paper's option): P and V in fp8 e4m3 at twice the bf16 MMA rate. P = 2^(x - m + 8)
  # is written to shared memory (8-bit A operands must be K-major), V is pre-scaled per (batch,
  # head) by a power of two into e4m3's range and transposed (K-major) by XLA. Costs accuracy and,
  # measured, time (the shared-memory round trip of P outweighs the faster MMA): off.
  pv_fp8: bool = False


GPU_TUNING = GpuTuning()
QK_DTYPES = {"float8_e4m3fn": jnp.float8_e4m3fn, "int8": jnp.int8}
# 2 * shift above which a bounded p = 2^(x - shift) could leave V's dtype's normal range.
_BOUND_LIMIT = {jnp.dtype(jnp.bfloat16): 100.0, jnp.dtype(jnp.float16): 14.0,
                jnp.dtype(jnp.float8_e4m3fn): 14.0}
# fp8 P is scaled by 2^_FP8_P_EXPONENT (cancels in O / l): p in (2^-6, 2^8], e4m3's normal range.
_FP8_P_EXPONENT = 8.0
# Scale factors are floored here so that a zero scale never multiplies a masked -inf into NaN.
_MIN_FACTOR = 1e-30
# Per-(batch, head) constants are padded to 128 bytes: bulk copies into shared memory need
# 128-byte aligned destinations.
_CONSTS_WIDTH = 32


def _gpu_unsupported_reason(q, k, v, mask: _Mask) -> str | None:
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  t = GPU_TUNING
  if v.dtype not in (jnp.bfloat16, jnp.float16):
    return f"V dtype {v.dtype} (the GPU kernel multiplies P V in bf16/f16; f32 takes the reference)"
  if mask.q_segments is not None and not mask.causal:
    return "segment ids (the GPU kernel takes None or 'causal')"
  if q_len % (2 * t.block_q) or kv_len % t.block_kv:
    return (f"lengths T={q_len}, S={kv_len} must be multiples of {2 * t.block_q} and "
            f"{t.block_kv}")
  return None


def _smem_transforms(dtype, head_dim):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  row_bytes = head_dim * jnp.dtype(dtype).itemsize
  swizzle = min(128, row_bytes)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


# 1.5 * 2^23: for |x| < 2^22, x + _ROUND_MAGIC rounds x to an integer r held in the low mantissa
# bits, and (bits << 23) is r << 23 (mod 2^32), the exponent increment of 2^r.
_ROUND_MAGIC = 12582912.0
# 2^f on [-1/2, 1/2], least squares in relative error: max relative error 7.7e-5 (bf16 P: 3.9e-3).
_EXP2_POLY = (0.9999289403695113, 0.6932762416819607, 0.24260405145947916, 0.0550886838075115)


def _exp2_fma(x):
  """exp2 for x <= 0 on the FMA/ALU pipes: 2^round(x) by exponent bits times a cubic in the rest."""
  x = jnp.maximum(x, -126.0)  # keeps the biased exponent of the result >= 0
  t = x + _ROUND_MAGIC
  f = x - (t - _ROUND_MAGIC)  # in [-1/2, 1/2]
  c0, c1, c2, c3 = _EXP2_POLY
  poly = ((c3 * f + c2) * f + c1) * f + c0
  bits = lax.bitcast_convert_type(poly, jnp.int32) + lax.shift_left(
      lax.bitcast_convert_type(t, jnp.int32), jnp.int32(23))
  return lax.bitcast_convert_type(bits, jnp.float32)


def _gpu_factors(q_scale, k_scale, p_dtype, v_scale, batch, q_len, kv_len, heads, head_dim):
  """Kernel constants. Per (batch, head): (factor, shift, use_bound, v_scale, 0...) as [B, N, 32]; per
  token also row factors and row shifts [B, N, T] and column factors [B, N, S] (else None)."""
  row, col = _kernel_factors(q_scale, k_scale, batch, q_len, kv_len, heads, head_dim)
  row = jnp.maximum(row * math.log2(math.e), _MIN_FACTOR)  # [B, N, T]
  if q_scale.shape[1] == 1:  # per-head scales: one factor per (batch, head)
    factor = jnp.maximum(row[..., 0] * col[..., 0], _MIN_FACTOR)  # [B, N]
    shift = head_dim * factor
    vectors = None
  else:
    row_shift = head_dim * row * col.max(axis=-1, keepdims=True)  # [B, N, T]
    shift = row_shift.max(axis=-1)
    factor = jnp.ones_like(shift)
    vectors = (row, row_shift, col)
  use_bound = (2 * shift <= _BOUND_LIMIT[jnp.dtype(p_dtype)]).astype(jnp.float32)
  consts = jnp.stack([factor, shift, use_bound, jnp.broadcast_to(v_scale, shift.shape)], axis=-1)
  consts = jnp.pad(consts, ((0, 0), (0, 0), (0, _CONSTS_WIDTH - 4)))
  return consts, vectors


def _gpu_forward(q_sign, q_scale, k_sign, k_scale, v, segments, *, causal,
                 tuning: GpuTuning = GPU_TUNING):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  del segments  # only causal (= arange segments) reaches this kernel.
  batch, q_len, heads, head_dim = q_sign.shape
  kv_len = k_sign.shape[1]
  block_q, block_kv, steps = tuning.block_q, tuning.block_kv, tuning.max_concurrent_steps
  if tuning.qk_dtype not in QK_DTYPES:
    raise ValueError(f"qk_dtype must be one of {tuple(QK_DTYPES)}, got {tuning.qk_dtype!r}")
  if tuning.poly_exp_cols % 8 or not 0 <= tuning.poly_exp_cols < block_kv:
    raise ValueError(f"poly_exp_cols must be a multiple of 8 below {block_kv}, got "
                     f"{tuning.poly_exp_cols}")
  qk_dtype = QK_DTYPES[tuning.qk_dtype]
  acc_dtype = jnp.int32 if qk_dtype == jnp.int8 else jnp.float32
  dtype = v.dtype
  if tuning.pv_fp8:
    # Power-of-two scale per (batch, head) into e4m3's range (max 448), V^T [B, N, H, S] K-major.
    amax = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=(1, 3))  # [B, N]
    v_scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / 256)))
    v_in = jnp.transpose(v.astype(jnp.float32) / v_scale[:, None, :, None], (0, 2, 3, 1))
    v_in = v_in.astype(jnp.float8_e4m3fn)
    p_dtype, p_offset = jnp.float8_e4m3fn, _FP8_P_EXPONENT
  else:
    v_in, v_scale, p_dtype, p_offset = v, jnp.float32(1), dtype, 0.0
  consts, vectors = _gpu_factors(q_scale, k_scale, p_dtype, v_scale, batch, q_len, kv_len, heads,
                                 head_dim)
  per_token = vectors is not None
  q8, k8 = q_sign.astype(qk_dtype), k_sign.astype(qk_dtype)
  num_kv_blocks = kv_len // block_kv
  row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

  def kernel(q_ref, k_ref, v_ref, consts_ref, vector_refs, out_ref, scoped):
    b, n, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    smem, barriers = scoped
    q_smem2, o_smem2, k_smem, v_smem, p_smem2, consts_smem2, rows_smem2, col_smem = smem
    q_barriers, k_barriers, v_barriers, col_barriers, k_consumed, v_consumed, schedule = barriers

    def rendezvous():
      if tuning.schedule_barrier:
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)
    if causal:
      max_kv_steps = pl.cdiv((tile + 1) * (2 * block_q), jnp.array(block_kv, jnp.int32))
    else:
      max_kv_steps = num_kv_blocks

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem, o_smem, consts_smem = q_smem2.at[wg], o_smem2.at[wg], consts_smem2.at[wg]
      q_base = tile * (2 * block_q) + wg * block_q
      copies = [(q_ref.at[b, pl.ds(q_base, block_q), n], q_smem),
                (consts_ref.at[b, n], consts_smem)]
      if per_token:
        row_ref, shift_ref, _ = vector_refs
        copies += [(row_ref.at[b, n, pl.ds(q_base, block_q)], rows_smem2.at[wg, 0]),
                   (shift_ref.at[b, n, pl.ds(q_base, block_q)], rows_smem2.at[wg, 1])]
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, q_barriers.at[wg * 4 + i])
      for i in range(len(copies)):
        plgpu.barrier_wait(q_barriers.at[wg * 4 + i])
      factor, shift, use_bound = consts_smem[0], consts_smem[1] - p_offset, consts_smem[2]
      if per_token:
        row_factor = plgpu.load(rows_smem2.at[wg, 0], layout=row_layout)
        row_shift = plgpu.load(rows_smem2.at[wg, 1], layout=row_layout) - p_offset
      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
      l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
      kv_steps = (pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32)) if causal
                  else max_kv_steps)

      def kv_step(step, carry, *, masked, bounded):
        acc, m_i, l_i = carry
        slot = lax.rem(step, jnp.array(steps, step.dtype))
        plgpu.barrier_wait(k_barriers.at[slot])
        if per_token:
          plgpu.barrier_wait(col_barriers.at[slot])

        def scores(acc_ref):  # 1. [block_q, block_kv], exact
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          rendezvous()
          return acc_ref[...]
        s = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), acc_dtype))
        if per_token:
          col_factor = plgpu.load(col_smem.at[slot], layout=col_layout)
        plgpu.barrier_arrive(k_consumed.at[slot])
        # 2. Base-2 logits x = s * f (per token: s * f_col first, f_row below).
        s = s.astype(jnp.float32)
        if per_token:
          s = s * lax.broadcast_in_dim(col_factor, s.shape, [1])
        if masked:
          q_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
          kv_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
          s = jnp.where(q_ids + q_base >= kv_ids + step * block_kv, s, -jnp.inf)
        row = lambda x, shape=s.shape: lax.broadcast_in_dim(x, shape, [0])
        # 3. p = exp2(x - m) with m the bound or the running max (f > 0: max(s f) = f max(s)).
        if bounded:
          m_new = m_i
          x = s * row(row_factor) - row(row_shift) if per_token else s * factor - shift
        else:
          s_max = s.max(axis=1)
          m_new = jnp.maximum(m_i, s_max * row_factor if per_token else s_max * factor)
          x = s * (row(row_factor) if per_token else factor) - row(m_new - p_offset)
        split = block_kv - tuning.poly_exp_cols
        if tuning.poly_exp_cols and not masked:
          p = jnp.concatenate([jnp.exp2(x[:, :split]), _exp2_fma(x[:, split:])], axis=1)
        else:
          p = jnp.exp2(x)
        if bounded:
          l_i = l_i + p.sum(axis=1)
        else:
          alpha = jnp.exp2(m_i - m_new)
          l_i = l_i * alpha + p.sum(axis=1)
          acc = acc * row(alpha, acc.shape)
        if tuning.pv_fp8:
          p_smem2.at[wg][...] = p.astype(p_dtype)
          plgpu.commit_smem()
        if tuning.schedule_barrier:
          plgpu.barrier_arrive(schedule)  # softmax done: hand the tensor cores over
        plgpu.barrier_wait(v_barriers.at[slot])
        if tuning.schedule_barrier:
          plgpu.barrier_wait(schedule)

        def pv(acc_ref):
          if tuning.pv_fp8:
            plgpu.wgmma(acc_ref, p_smem2.at[wg], v_smem.at[slot].transpose((1, 0)))
          else:
            plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l_i

      def kv_loop(carry, bounded):
        if causal:
          full_steps = lax.div(q_base, jnp.array(block_kv, jnp.int32))
          carry = lax.fori_loop(0, full_steps, functools.partial(
              kv_step, masked=False, bounded=bounded), carry)
          return lax.fori_loop(full_steps, kv_steps, functools.partial(
              kv_step, masked=True, bounded=bounded), carry)
        return lax.fori_loop(0, kv_steps, functools.partial(
            kv_step, masked=False, bounded=bounded), carry)

      carry = (acc, m_i, l_i)
      pl.when(wg == 1)(rendezvous)  # offsets the two warpgroups by half an iteration
      if tuning.bounded_softmax:
        carry = lax.cond(use_bound > 0, functools.partial(kv_loop, bounded=True),
                         functools.partial(kv_loop, bounded=False), carry)
      else:
        carry = kv_loop(carry, bounded=False)
      if causal:
        @pl.loop(kv_steps, max_kv_steps)
        def _release(step):  # slots loaded for the other warpgroup's longer range
          slot = lax.rem(step, jnp.array(steps, step.dtype))
          plgpu.barrier_arrive(k_consumed.at[slot])
          plgpu.barrier_arrive(v_consumed.at[slot])
          rendezvous()
          rendezvous()
      pl.when(wg == 0)(rendezvous)
      acc, _, l_i = carry
      if tuning.pv_fp8:
        l_i = l_i / consts_smem[3]  # V's scale
      acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
      o_smem[...] = acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(q_base, block_q), n])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def load(step, slot):
        kv = (b, pl.ds(step * block_kv, block_kv), n)
        plgpu.copy_gmem_to_smem(k_ref.at[kv], k_smem.at[slot], k_barriers.at[slot])
        if per_token:
          plgpu.copy_gmem_to_smem(vector_refs[2].at[b, n, pl.ds(step * block_kv, block_kv)],
                                  col_smem.at[slot], col_barriers.at[slot])
        v_src = (v_ref.at[b, n, :, pl.ds(step * block_kv, block_kv)] if tuning.pv_fp8
                 else v_ref.at[kv])
        plgpu.copy_gmem_to_smem(v_src, v_smem.at[slot], v_barriers.at[slot])

      for i in range(min(steps, num_kv_blocks)):  # static bound: slices are checked at trace time
        pl.when(i < max_kv_steps)(functools.partial(load, i, i))

      @pl.loop(0, max_kv_steps - steps)
      def _stream(step):
        slot = lax.rem(step, jnp.array(steps, step.dtype))
        plgpu.barrier_wait(k_consumed.at[slot])
        plgpu.barrier_wait(v_consumed.at[slot])
        load(step + steps, slot)

  def entry(q_ref, k_ref, v_ref, consts_ref, *rest):
    *vector_refs, out_ref = rest
    qk_tf, v_tf = _smem_transforms(qk_dtype, head_dim), _smem_transforms(dtype, head_dim)
    p8_tf = _smem_transforms(jnp.float8_e4m3fn, block_kv)
    v_tile = (head_dim, block_kv) if tuning.pv_fp8 else (block_kv, head_dim)
    # Swizzled tiles first (each a multiple of 1 KiB, so every one stays swizzle-aligned), then the
    # f32 vectors (slots of multiples of 128 bytes).
    smem = (plgpu.SMEM((2, block_q, head_dim), qk_dtype, transforms=qk_tf),
            plgpu.SMEM((2, block_q, head_dim), dtype, transforms=v_tf),
            plgpu.SMEM((steps, block_kv, head_dim), qk_dtype, transforms=qk_tf),
            plgpu.SMEM((steps, *v_tile), v_in.dtype, transforms=p8_tf if tuning.pv_fp8 else v_tf),
            plgpu.SMEM((2, block_q, block_kv), p_dtype, transforms=p8_tf) if tuning.pv_fp8 else None,
            plgpu.SMEM((2, _CONSTS_WIDTH), jnp.float32),
            plgpu.SMEM((2, 2, block_q), jnp.float32) if per_token else None,
            plgpu.SMEM((steps, block_kv), jnp.float32) if per_token else None)
    barriers = (plgpu.Barrier(num_barriers=8),  # 4 per compute warpgroup: q, consts, row vectors
                *(plgpu.Barrier(num_barriers=steps) for _ in range(3)),
                *(plgpu.Barrier(num_arrivals=2, num_barriers=steps) for _ in range(2)),
                plgpu.Barrier(num_arrivals=2))
    pl.run_scoped(lambda smem_refs, barrier_refs: kernel(
        q_ref, k_ref, v_ref, consts_ref, vector_refs, out_ref, (smem_refs, barrier_refs)),
                  smem, barriers, collective_axes="wg")

  vector_args = () if vectors is None else vectors
  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype),
      grid=(heads, q_len // (2 * block_q), batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q8, k8, v_in, consts, *vector_args)
  return out
