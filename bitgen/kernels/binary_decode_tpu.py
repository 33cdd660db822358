"""TPU decode kernel over a bit-packed key cache (Pallas, Mosaic TPU).

A grid step takes `block_s` cache rows of one sequence with ALL heads, read straight from the cache
layout with free reshapes: words [block_s, N*W], scales [block_s, N], values [block_s, N*H]. So every
block's last dims are whole array dims (no (8, 128) tiling constraint on N, W or H) and one DMA
moves contiguous rows. Per step, in VMEM:
  1. popcount(k_words xor q_words)                      [block_s, N*W] int32 (VPU)
  2. differ = G . popcount, G[n, j] = 1[j // W == n]     [N, block_s]: the word groups summed and
     the heads moved to sublanes by one MXU product (exact: counts <= 32 are exact in bf16)
  3. s = (H - 2 differ) * s_k^T * s_q / sqrt(H), online softmax in f32 along the keys (lanes)
  4. P [N, block_s] . V [block_s, N*H] on the MXU -> [N, N*H], of which head n keeps its own
     H columns (N times the needed MXU work, still far below the value bytes' DMA time).
Steps past a sequence's length are skipped and re-use the last valid block index (no DMA).
The cache grid axis is sequential ("arbitrary"); batch is "parallel" (megacore).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

# Finite, so exp(masked - max) = 0 without inf - inf.
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands


@dataclasses.dataclass(frozen=True)
class TpuDecodeTuning:
  block_s: int = 256  # cache rows a grid step (x N*H values: 1 MiB of bf16 at N=16, H=128)


TPU_DECODE_TUNING = TpuDecodeTuning()


def unsupported_reason(k_bits, v, tuning: TpuDecodeTuning = TPU_DECODE_TUNING) -> str | None:
  cache, head_dim = k_bits.shape[1], v.shape[-1]
  if head_dim % 64:
    return f"head dim {head_dim} (the TPU decode kernel takes multiples of 64)"
  if cache % min(tuning.block_s, cache) or cache % 8:
    return f"cache length {cache} not a multiple of {tuning.block_s} (or of 8 below it)"
  return None


def binary_decode_tpu(q_bits, q_scale, k_bits, k_scale, v, lengths,
                      tuning: TpuDecodeTuning = TPU_DECODE_TUNING, interpret: bool = False):
  """q_bits [B, N, W] uint32, q_scale [B, N] (`pack_signs(q)`); k_bits [B, S, N, W] uint32,
  k_scale [B, S, N], v [B, S, N, H], lengths [B]. Returns [B, N, H] in v.dtype."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  batch, cache, heads, words = k_bits.shape
  head_dim = v.shape[-1]
  block_s = min(tuning.block_s, cache)
  num_blocks = cache // block_s
  as_int = lambda x: lax.bitcast_convert_type(x, jnp.int32)
  q_words = as_int(q_bits).reshape(batch, 1, heads * words)
  q_factor = (q_scale / math.sqrt(head_dim)).astype(jnp.float32).reshape(batch, heads, 1)
  k_words = as_int(k_bits).reshape(batch, cache, heads * words)
  k_scale = k_scale.astype(jnp.float32)
  values = v.reshape(batch, cache, heads * head_dim)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, cache)

  def kernel(len_ref, qw_ref, qf_ref, kw_ref, ks_ref, v_ref, o_ref, m_scr, l_scr, acc_scr):
    b, j = pl.program_id(0), pl.program_id(1)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
      m_scr[...] = jnp.full(m_scr.shape, _MASK, jnp.float32)
      l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j * block_s < length)
    def _step():
      counts = lax.population_count(kw_ref[...] ^ qw_ref[...])  # [bs, N*W]
      word_head = lax.broadcasted_iota(jnp.int32, (heads, heads * words), 1)
      head = lax.broadcasted_iota(jnp.int32, (heads, heads * words), 0)
      groups = ((word_head >= head * words) & (word_head < (head + 1) * words)).astype(jnp.bfloat16)
      differ = lax.dot_general(groups, counts.astype(jnp.bfloat16), _NT,
                               preferred_element_type=jnp.float32)  # [N, bs]
      s = (head_dim - 2 * differ) * ks_ref[...].T * qf_ref[...]  # [N, bs]
      key = j * block_s + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
      s = jnp.where(key < length, s, _MASK)
      m_prev = m_scr[...]
      m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # [N, 1]
      alpha = jnp.exp(m_prev - m_new)
      p = jnp.exp(s - m_new)
      l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
      # Values past the length may be anything (a cache's unwritten tail): 0 * NaN is NaN.
      row = j * block_s + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
      vals = jnp.where(row < length, v_ref[...], jnp.zeros((), v_ref.dtype))
      pv = jnp.dot(p.astype(vals.dtype), vals, preferred_element_type=jnp.float32)  # [N, N*H]
      head_row = lax.broadcasted_iota(jnp.int32, (heads, head_dim), 0)
      own = jnp.zeros((heads, head_dim), jnp.float32)
      for n in range(heads):  # head n keeps row n of its own H columns
        own = jnp.where(head_row == n, pv[:, n * head_dim:(n + 1) * head_dim], own)
      acc_scr[...] = alpha * acc_scr[...] + own
      m_scr[...] = m_new

    @pl.when(j == num_blocks - 1)
    def _finish():
      o_ref[...] = (acc_scr[...] / l_scr[...]).astype(o_ref.dtype)

  def cache_map(b, j, len_ref):  # steps past the length re-use the last valid block
    return (b, jnp.minimum(j, lax.div(jnp.maximum(len_ref[b] - 1, 0), block_s)), 0)

  squeeze = None
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_blocks),
          in_specs=[
              pl.BlockSpec((squeeze, 1, heads * words), lambda b, j, _: (b, 0, 0)),
              pl.BlockSpec((squeeze, heads, 1), lambda b, j, _: (b, 0, 0)),
              pl.BlockSpec((squeeze, block_s, heads * words), cache_map),
              pl.BlockSpec((squeeze, block_s, heads), cache_map),
              pl.BlockSpec((squeeze, block_s, heads * head_dim), cache_map),
          ],
          out_specs=pl.BlockSpec((squeeze, heads, head_dim), lambda b, j, _: (b, 0, 0)),
          scratch_shapes=[pltpu.VMEM((heads, 1), jnp.float32),
                          pltpu.VMEM((heads, 1), jnp.float32),
                          pltpu.VMEM((heads, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((batch, heads, head_dim), v.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="binary_decode_attention",
  )(lengths, q_words, q_factor, k_words, k_scale, values)
