"""Binary attention on TPU (Mosaic TPU): flash attention over [B, N, T, H] with int8 +-1 scores on
the MXU, f32 online softmax, segment-id (block-causal) masks with whole-block skipping.

The forward kernel behind `binary_attention(..., implementation="pallas_tpu")`, which binarises
q and k (`_binarize`) around it; off a TPU it runs in the Pallas TPU interpreter.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from bitgen.kernels._binarize import MASK_VALUE, kernel_factors


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  block_q: int = 512
  block_kv: int = 512


def _round_up(x, m):
  return -(-x // m) * m


def binary_attention_tpu(q_sign, q_scale, k_sign, k_scale, v, segments, *, causal,
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

  row, col = kernel_factors(q_scale, k_scale, batch, q_len, kv_len, heads, head_dim)
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
