"""GPU kernels for `quantized_matmul`, written in Pallas for its Triton backend (Hopper first).

Two paths, chosen by the number of rows M of x:
- GEMV (M <= 16, decode): one program per block of `block_n` output channels streams its weight rows
  once over all of K. Ternary words are unpacked in registers, one 2-bit plane at a time (see
  `ternary_pack`: plane j of a group is a contiguous run of K), and fed to an int8 MMA with the
  weights as the M side ("swap AB": the tensor cores need >= 16 rows, the activations give only M).
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
  block_n: int = 64
  block_k: int = 1024  # K values a step; for ternary weights 16 x (words a step), dividing 16 G
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


def default_config(m: int, k: int, n: int, ternary: bool) -> GemvConfig | GemmConfig | str:
  """The tuned block sizes for a shape, or the reason no kernel fits it."""
  if m <= GEMV_MAX_M:
    block_n = _largest_dividing(n, (64, 32, 16))
    if block_n is None:
      return f"GEMV needs N a multiple of 16, got N={n}"
    if ternary:
      g = ternary_pack.group_words(k)
      if g < _MIN_DOT_K:
        return f"ternary GEMV needs packing groups of >= {_MIN_DOT_K} words (K a multiple of 512), got K={k}"
      return GemvConfig(block_n=block_n, block_k=ternary_pack.VALUES_PER_WORD * min(g, 64))
    block_k = _largest_dividing(k, (1024, 512, 256, 128, 64, 32))
    if block_k is None:
      return f"int8 GEMV needs K a multiple of 32, got K={k}"
    return GemvConfig(block_n=block_n, block_k=block_k)
  block_n = _largest_dividing(n, (256, 128, 64, 32))
  block_k = _largest_dividing(k, (128, 64, 32))
  if block_n is None or block_k is None:
    return f"GEMM needs N and K multiples of 32, got N={n}, K={k}"
  return GemmConfig(block_n=block_n, block_k=block_k, num_warps=8 if block_n == 256 else 4)


def unsupported_reason(m: int, k: int, n: int, ternary: bool) -> str | None:
  if m == 0:
    return "empty input"
  config = default_config(m, k, n, ternary)
  return config if isinstance(config, str) else None


def _epilogue(acc, x_scale, w_scale, out_dtype):
  """[rows, cols] int32 -> out_dtype; scales broadcast along rows and columns (None: int32 out)."""
  if x_scale is None:
    return acc
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)


def _gemv_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_k, ternary, scaled):
  # x_ref [16, K] int8 (rows >= M masked), w_ref [bn, K // 16] int32 words or [bn, K] int8,
  # xs_ref [16], ws_ref [bn], o_ref [16, bn].
  block_n = w_ref.shape[0]
  k = x_ref.shape[1]
  group = ternary_pack.group_words(k) if ternary else 0
  words = block_k // ternary_pack.VALUES_PER_WORD  # words a step, dividing the group

  def step(t, acc):  # acc [bn, 16] int32: the transposed output block
    if not ternary:
      k0 = pl.multiple_of(t * block_k, block_k)
      w = w_ref[:, pl.ds(k0, block_k)]  # [bn, bk]
      x = x_ref[:, pl.ds(k0, block_k)]  # [16, bk]
      return acc + lax.dot_general(w, x, _NT, preferred_element_type=jnp.int32)
    w0 = pl.multiple_of(t * words, words)
    packed = w_ref[:, pl.ds(w0, words)]  # [bn, words]: words [i, i + words) of group g
    g, i = w0 // group, w0 % group
    for j in range(ternary_pack.VALUES_PER_WORD):
      # Plane j holds K offsets 16 G g + G j + [i, i + words) of every row, as codes; minus 1.
      w_plane = (((packed >> (ternary_pack.BITS_PER_VALUE * j)) & 3) - 1).astype(jnp.int8)
      x0 = pl.multiple_of(g * (ternary_pack.VALUES_PER_WORD * group) + j * group + i, words)
      x_plane = x_ref[:, pl.ds(x0, words)]  # [16, words]
      acc = acc + lax.dot_general(w_plane, x_plane, _NT, preferred_element_type=jnp.int32)
    return acc

  acc = lax.fori_loop(0, k // block_k, step, jnp.zeros((block_n, GEMV_MAX_M), jnp.int32))
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


def _grouped_tile(p, num_m: int, num_n: int, group_m: int):
  """Program id -> (row tile, column tile), walking `group_m` row tiles per column sweep."""
  programs_per_group = group_m * num_n
  first_m = (p // programs_per_group) * group_m
  rows_in_group = jnp.minimum(num_m - first_m, group_m)
  within = p % programs_per_group
  return first_m + within % rows_in_group, within // rows_in_group


def matmul(x, w, x_scale, w_scale, *, out_dtype, interpret: bool = False, config=None):
  """x [M, K] int8; w [N, K] int8 or [N, K // 16] uint32 ternary; scales [M], [N] f32 or None."""
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  config = config or default_config(m, k, n, ternary)
  if isinstance(config, str):
    raise ValueError(config)
  scaled = x_scale is not None
  if not scaled:
    x_scale, w_scale = jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32)
  params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)

  if isinstance(config, GemvConfig):
    if ternary:  # the same bits as int32: the kernel only shifts right and masks 2 bits.
      w = lax.bitcast_convert_type(w, jnp.int32)
    kernel = lambda *refs: _gemv_kernel(*refs, block_k=config.block_k, ternary=ternary, scaled=scaled)
    block_n = config.block_n
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(n // block_n,),
        in_specs=[
            pl.BlockSpec((GEMV_MAX_M, k), lambda i: (0, 0)),
            pl.BlockSpec((block_n, w.shape[1]), lambda i: (i, 0)),
            pl.BlockSpec((GEMV_MAX_M,), lambda i: (0,)),
            pl.BlockSpec((block_n,), lambda i: (i,)),
        ],
        out_specs=pl.BlockSpec((GEMV_MAX_M, block_n), lambda i: (0, i)),
        compiler_params=params,
        interpret=interpret,
        name="ternary_gemv" if ternary else "int8_gemv",
    )(x, w, x_scale, w_scale)

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
