"""GPU kernels for `quantized_matmul`, written in Pallas for its Triton backend (Hopper first).

Triton, not Mosaic GPU: a first kernel that runs on jax 0.11.2 and 0.12 alike (jax warns that the
Pallas Triton backend is deprecated); a Mosaic GPU (`plgpu`, wgmma) version is still to be written.

Two paths, chosen by the number of rows M of x:
- GEMV (M <= 16, decode): a program per (block of `block_n` output channels, split of K) streams its
  weight rows once; splits write int32 partials that one small XLA op sums and scales. Each step
  unpacks a tile of ternary words in registers into all 16 planes at once (see `ternary_pack`: plane
  j of a group is a contiguous run of K, so the activations are read as plain slices) and feeds one
  int8 MMA with the weights as the M side ("swap AB": the tensor cores need >= 16 rows; x has M).
- GEMM (M > 16, prefill / training shapes): an output-tiled int8 x int8 -> int32 MMA over K, both
  operands K-major, programs ordered in column groups for L2 reuse. Ternary weights are unpacked to
  int8 first: this path is bound by arithmetic, not by weight bytes.
Scales are applied in the epilogue, so the int32 accumulator never reaches memory.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bitgen.kernels import ternary_pack

GEMV_MAX_M = 16
_MIN_DOT_K = 32  # int8 MMA consumes K in steps of 32.
_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands (both K-major)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  block_n: int = 128
  block_k: int = 512  # K values a step; for ternary weights 16 x (words a step), dividing 16 G
  split_k: int = 1  # programs sharing a block of channels, each over K / split_k (int32 partials)
  num_warps: int = 4
  num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  block_m: int = 128
  block_n: int = 256
  block_k: int = 128
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 3


def _largest_dividing(n: int, candidates) -> int | None:
  return next((c for c in candidates if n % c == 0), None)


_SM_COUNT = 132  # H100 / H200


def _gemv_split(k: int, n: int, block_n: int, unit: int) -> int:
  """Splits of K (each a multiple of `unit`) until the programs cover the multiprocessors."""
  split = 1
  while (n // block_n) * split < _SM_COUNT and k % (2 * split * unit) == 0:
    split *= 2
  return split


def default_config(m: int, k: int, n: int, ternary: bool) -> GemvConfig | GemmConfig | str:
  """The tuned block sizes for a shape, or the reason no kernel fits it."""
  if m <= GEMV_MAX_M:
    block_n = _largest_dividing(n, (128, 64, 32, 16))
    if block_n is None:
      return f"GEMV needs N a multiple of 16, got N={n}"
    if ternary:  # tuned at M=8, K=N=8192 on an H100 (bench --sweep)
      g = ternary_pack.group_words(k)
      if g < _MIN_DOT_K:
        return f"ternary GEMV needs packing groups of >= {_MIN_DOT_K} words (K a multiple of 512), got K={k}"
      block_n, group_values = min(block_n, 64), ternary_pack.VALUES_PER_WORD * g
      return GemvConfig(block_n=block_n, block_k=ternary_pack.VALUES_PER_WORD * min(g, 64),
                        split_k=_gemv_split(k, n, block_n, group_values), num_warps=8)
    block_k = _largest_dividing(k, (256, 128, 64, 32))
    if block_k is None:
      return f"int8 GEMV needs K a multiple of 32, got K={k}"
    split = _gemv_split(k, n, block_n, block_k)
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, num_stages=4)
  block_n = _largest_dividing(n, (256, 128, 64, 32))
  block_k = _largest_dividing(k, (128, 64, 32))
  if block_n is None or block_k is None:
    return f"GEMM needs N and K multiples of 32, got N={n}, K={k}"
  return GemmConfig(block_n=block_n, block_k=block_k, num_warps=8 if block_n == 256 else 4)


def _epilogue(acc, x_scale, w_scale, out_dtype):
  """[rows, cols] int32 -> out_dtype; scales broadcast along rows and columns (None: int32 out)."""
  if x_scale is None:
    return acc
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)


def _gemv_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_k, ternary, scaled):
  # One split of K: o_ref [16, bn] (scaled output, or int32 partial sums of this split),
  # xs_ref [16], ws_ref [bn]; int8 weights: x_ref [16, K / S] (rows >= M masked), w_ref [bn, K / S];
  # ternary: x_ref [16, K / (G S), G] (x with K split into runs of G), w_ref [bn, K / (16 S)] words.
  block_n = w_ref.shape[0]

  def step(t, acc):  # acc [bn, 16] int32: the transposed output block
    if not ternary:
      k0 = pl.multiple_of(t * block_k, block_k)
      w = w_ref[:, pl.ds(k0, block_k)]  # [bn, bk]
      x = x_ref[:, pl.ds(k0, block_k)]  # [16, bk]
      return acc + lax.dot_general(w, x, _NT, preferred_element_type=jnp.int32)
    group = x_ref.shape[2]
    words = block_k // ternary_pack.VALUES_PER_WORD  # words a step, dividing the group
    w0 = pl.multiple_of(t * words, words)
    packed = w_ref[:, pl.ds(w0, words)]  # [bn, words]: words [i, i + words) of group g
    g, i = lax.div(w0, jnp.int32(group)), lax.rem(w0, jnp.int32(group))  # w0 >= 0
    # Bit pair j of word i holds K offset 16 G g + G j + i: unpack all 16 planes at once, in the
    # order (j, i), and read x's runs 16 g + j, columns [i, i + words) in the same order.
    shifts = ternary_pack.BITS_PER_VALUE * lax.broadcasted_iota(jnp.int32, (1, 16, 1), 1)
    codes = (packed[:, None, :] >> shifts) & 3  # [bn, 16, words]
    w = (codes - 1).astype(jnp.int8).reshape(block_n, block_k)
    x = x_ref[:, pl.ds(pl.multiple_of(g * 16, 16), 16), pl.ds(pl.multiple_of(i, words), words)]
    x = x.reshape(GEMV_MAX_M, block_k)  # [16, 16 * words]
    return acc + lax.dot_general(w, x, _NT, preferred_element_type=jnp.int32)

  num_steps = (x_ref.shape[1] * (x_ref.shape[2] if ternary else 1)) // block_k
  acc = lax.fori_loop(0, num_steps, step, jnp.zeros((block_n, GEMV_MAX_M), jnp.int32))
  if scaled:
    acc = _epilogue(acc, xs_ref[...][None, :], ws_ref[...][:, None], o_ref.dtype)
  o_ref[...] = acc.T


def _gemm_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_k, scaled):
  # x_ref [bm, K] int8, w_ref [bn, K] int8, xs_ref [bm], ws_ref [bn], o_ref [bm, bn].
  block_m, k = x_ref.shape
  block_n = w_ref.shape[0]

  def step(t, acc):
    k0 = pl.multiple_of(t * block_k, block_k)
    x = x_ref[:, pl.ds(k0, block_k)]  # [bm, bk]
    w = w_ref[:, pl.ds(k0, block_k)]  # [bn, bk]
    return acc + lax.dot_general(x, w, _NT, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, k // block_k, step, jnp.zeros((block_m, block_n), jnp.int32))
  if scaled:
    acc = _epilogue(acc, xs_ref[...][:, None], ws_ref[...][None, :], o_ref.dtype)
  o_ref[...] = acc


def _gemv(x, w, x_scale, w_scale, config: GemvConfig, params, *, out_dtype, scaled, interpret):
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  bn, splits = config.block_n, config.split_k
  if ternary:
    group = ternary_pack.group_words(k)
    x = x.reshape(m, k // group, group)  # free: runs of G values, as the packing groups them
    x_spec = pl.BlockSpec((GEMV_MAX_M, k // (group * splits), group), lambda i, s: (0, s, 0))
    w = lax.bitcast_convert_type(w, jnp.int32)  # the same bits: the kernel shifts right and masks
  else:
    x_spec = pl.BlockSpec((GEMV_MAX_M, k // splits), lambda i, s: (0, s))
  if splits > 1:  # int32 partials [S, 16, N], summed and scaled below: exact like the reference
    out_shape = jax.ShapeDtypeStruct((splits, GEMV_MAX_M, n), jnp.int32)
    out_spec = pl.BlockSpec((None, GEMV_MAX_M, bn), lambda i, s: (s, 0, i))
  else:
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_spec = pl.BlockSpec((GEMV_MAX_M, bn), lambda i, s: (0, i))
  out = pl.pallas_call(
      lambda *refs: _gemv_kernel(*refs, block_k=config.block_k, ternary=ternary,
                                 scaled=scaled and splits == 1),
      out_shape=out_shape,
      grid=(n // bn, splits),
      in_specs=[
          x_spec,
          pl.BlockSpec((bn, w.shape[1] // splits), lambda i, s: (i, s)),
          pl.BlockSpec((GEMV_MAX_M,), lambda i, s: (0,)),
          pl.BlockSpec((bn,), lambda i, s: (i,)),
      ],
      out_specs=out_spec,
      compiler_params=params,
      interpret=interpret,
      name="ternary_gemv" if ternary else "int8_gemv",
  )(x, w, x_scale, w_scale)
  if splits == 1:
    return out
  acc = jnp.sum(out[:, :m], axis=0)  # [M, N] int32; rows >= M of the partials are padding
  return _epilogue(acc, x_scale[:, None], w_scale[None, :], out_dtype) if scaled else acc


def _grouped_tile(p, num_m: int, num_n: int, group_m: int):
  """Program id -> (row tile, column tile), walking `group_m` row tiles per column sweep."""
  programs_per_group = group_m * num_n
  first_m = (p // programs_per_group) * group_m
  rows_in_group = jnp.minimum(num_m - first_m, group_m)
  within = p % programs_per_group
  return first_m + within % rows_in_group, within // rows_in_group


def matmul(x, w, x_scale, w_scale, *, config, scaled: bool, out_dtype, interpret: bool = False):
  """x [M, K] int8; w [N, K] int8 or [N, K // 16] uint32 ternary; scales [M], [N] f32 (applied
  when `scaled`); `config` from `default_config` (the dispatcher in quantized_matmul.py checks it)."""
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)

  if isinstance(config, GemvConfig):
    return _gemv(x, w, x_scale, w_scale, config, params, out_dtype=out_dtype, scaled=scaled,
                 interpret=interpret)

  if ternary:  # compute-bound: unpack once to int8, then the int8 MMA.
    w = ternary_pack.unpack_ternary(w)
  bm, bn = config.block_m, config.block_n
  num_m, num_n = pl.cdiv(m, bm), n // bn
  tile = lambda p: _grouped_tile(p, num_m, num_n, config.group_m)
  return pl.pallas_call(
      lambda *refs: _gemm_kernel(*refs, block_k=config.block_k, scaled=scaled),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_m * num_n,),
      in_specs=[
          pl.BlockSpec((bm, k), lambda p: (tile(p)[0], 0)),
          pl.BlockSpec((bn, k), lambda p: (tile(p)[1], 0)),
          pl.BlockSpec((bm,), lambda p: (tile(p)[0],)),
          pl.BlockSpec((bn,), lambda p: (tile(p)[1],)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda p: tile(p)),
      compiler_params=params,
      interpret=interpret,
      name="int8_gemm",
  )(x, w, x_scale, w_scale)
