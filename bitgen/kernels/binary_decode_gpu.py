"""GPU decode kernel over a bit-packed key cache (Pallas, Triton backend): split-K flash decoding.

Why Triton and not Mosaic GPU: the scores need, per key, popcount(q_bits xor k_bits) over the
ceil(H/32) words of a key (sign q . sign k = H - 2 popcount). Mosaic GPU at jax 0.11.2 has no
`population_count` lowering, and its register layouts (WGMMA fragments, strided vectors) cannot
gather bit d % 32 of word d // 32 into a [keys, H] tile nor reduce a [keys, words] strided array
over its minor axis; Triton has `__nv_popc` and free-form register tiles. The same kernel lowers on
jax 0.11.2 and 0.12 (jax warns that the Pallas Triton backend is deprecated).

One program per (group of G heads, split, batch): the split's `chunk` keys of one sequence and G
heads, in steps of `block_s` keys. A step reads the packed words [block_s, G, W], scales
[block_s, G] and bf16 values [block_s, G, H] (rows of G contiguous heads), never an unpacked key:
  1. differ = sum_w popcount(q_bits[w] xor k_bits[:, w])          (int32, in registers)
  2. s = (H - 2 differ) * s_k * (s_q log2(e) / sqrt(H))            (logits in base 2)
  3. online softmax in f32 (exp2), acc += sum_s p[s] v[s, :]       (f32)
Keys at or past the sequence's length are masked, and the steps past it are never run. Programs
write (acc, max, sum) partials; XLA merges the splits (flash decoding). Head groups are the fastest
grid axis, so the key words and scales of neighbouring groups share L2 sectors.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
  # Measured on H200 (bench --decode-sweep, S=32k N=16 H=128): 8 heads x 16 keys a step beat one
  # head x 128 keys by 12% at B=8 (0.333 vs 0.379 ms) and 19% at B=64 (2.39 vs 2.97 ms).
  block_s: int = 16  # keys a loop step
  chunk: int = 1024  # keys a program (a multiple of block_s): splits = ceil(S / chunk)
  num_warps: int = 4
  num_stages: int = 2
  heads: int = 8  # heads a program: contiguous rows of G heads (lowered to gcd(G, N))


DECODE_TUNING = DecodeTuning()


def unsupported_reason(k_bits, v, tuning: DecodeTuning = DECODE_TUNING) -> str | None:
  cache, head_dim = k_bits.shape[1], v.shape[-1]
  if jax.default_backend() not in ("gpu", "cuda"):
    return "the Triton decode kernel needs a CUDA GPU"
  if head_dim & (head_dim - 1) or head_dim < 32:
    return f"head dim {head_dim} (the kernel takes powers of two >= 32)"
  if cache % tuning.block_s:
    return f"cache length {cache} not a multiple of {tuning.block_s}"
  return None


def decode_partials(q_bits, q_factor, k_bits, k_scale, v, lengths,
                    tuning: DecodeTuning = DECODE_TUNING, interpret: bool = False):
  """Per-split partials. q_bits [B, N, W] int32, q_factor [B, N] f32 (s_q log2(e) / sqrt(H)),
  k_bits [B, S, N, W] int32, k_scale [B, S, N] f32, v [B, S, N, H], lengths [B] int32 in [1, S].

  Returns acc [B, N, splits, H] f32 (unnormalised), row max m and row sum l [B, N, splits] f32,
  all in base 2 (p = exp2(s - m)); a split with no valid key has m = -inf, l = 0, acc = 0.
  """
  batch, cache, heads, words = k_bits.shape
  head_dim = v.shape[-1]
  block_s, chunk = tuning.block_s, tuning.chunk
  splits = pl.cdiv(cache, chunk)
  group = math.gcd(tuning.heads, heads)  # a power of two dividing N

  def kernel(len_ref, qb_ref, qf_ref, kb_ref, ks_ref, v_ref, acc_ref, m_ref, l_ref):
    g, c, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads_ = pl.ds(pl.multiple_of(g * group, group), group)
    start = c * chunk
    end = jnp.minimum(start + chunk, len_ref[b])
    num_steps = pl.cdiv(jnp.maximum(end - start, 0), block_s)
    q_words = qb_ref[b, heads_, :]  # [G, W]
    q_factor = qf_ref[b, heads_]  # [G]

    def step(i, carry):
      acc, m, l = carry  # [G, H], [G], [G]
      s0 = pl.multiple_of(start + i * block_s, block_s)
      keys = pl.ds(s0, block_s)
      words = kb_ref[b, keys, heads_, :]  # [bs, G, W]
      differ = lax.population_count(words ^ q_words[None]).sum(axis=2)  # [bs, G]
      s = (head_dim - 2 * differ).astype(jnp.float32) * ks_ref[b, keys, heads_] * q_factor[None]
      valid = (s0 + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)) < end  # [bs, 1]
      s = jnp.where(valid, s, -jnp.inf)
      # Values past the length may be anything (a cache's unwritten tail): 0 * NaN is NaN.
      v = jnp.where(valid[:, :, None], v_ref[b, keys, heads_, :].astype(jnp.float32), 0.0)
      m_new = jnp.maximum(m, s.max(axis=0))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - m_new[None])  # [bs, G]
      acc = acc * alpha[:, None] + (p[:, :, None] * v).sum(axis=0)
      return acc, m_new, l * alpha + p.sum(axis=0)

    init = (jnp.zeros((group, head_dim), jnp.float32), jnp.full((group,), -jnp.inf, jnp.float32),
            jnp.zeros((group,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_steps, step, init)
    acc_ref[b, heads_, c, :] = acc
    m_ref[b, heads_, c] = m
    l_ref[b, heads_, c] = l

  f32 = jnp.float32
  return pl.pallas_call(
      kernel,
      grid=(heads // group, splits, batch),
      out_shape=(jax.ShapeDtypeStruct((batch, heads, splits, head_dim), f32),
                 jax.ShapeDtypeStruct((batch, heads, splits), f32),
                 jax.ShapeDtypeStruct((batch, heads, splits), f32)),
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      name="binary_decode_attention",
      interpret=interpret,
  )(lengths, q_bits, q_factor, k_bits, k_scale, v)


def merge_splits(acc, m, l):
  """acc [B, N, splits, H], m, l [B, N, splits] (base 2) -> [B, N, H] f32."""
  m_all = m.max(axis=-1, keepdims=True)
  weight = jnp.exp2(m - m_all)  # a split with no key: exp2(-inf) = 0
  return (acc * weight[..., None]).sum(-2) / (l * weight).sum(-1)[..., None]


def binary_decode_gpu(q_bits, q_scale, k_bits, k_scale, v, lengths,
                      tuning: DecodeTuning = DECODE_TUNING, interpret: bool = False):
  """q_bits [B, N, W] uint32 and q_scale [B, N] from `pack_signs(q)`; the cache as in
  `binary_decode_attention`. Returns [B, N, H] in v.dtype. interpret: the Pallas interpreter
  (CPU tests)."""
  head_dim = v.shape[-1]
  q_factor = q_scale * (math.log2(math.e) / math.sqrt(head_dim))
  as_int = lambda x: lax.bitcast_convert_type(x, jnp.int32)  # popcount / xor on int32
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, k_bits.shape[1])
  partials = decode_partials(as_int(q_bits), q_factor, as_int(k_bits), k_scale.astype(jnp.float32),
                             v, lengths, tuning, interpret)
  return merge_splits(*partials).astype(v.dtype)
