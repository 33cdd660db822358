"""GPU kernels for `quantized_matmul` (Hopper first), one per path, chosen by the rows M of x:

- GEMV (M <= 16, decode): Pallas Mosaic GPU, `quantized_matmul_gpu_gemv` (weights read once through
  a TMA pipeline, ternary words unpacked in registers into the wgmma operand; one kernel, scaled
  output written by the kernel, except small N split over K: partial sums reduced by XLA).
- GEMM (M > 16, prefill / training shapes, and decode shapes the GEMV cannot take): Pallas Mosaic
  GPU, `quantized_matmul_gpu_gemm` (int8 wgmma). Ternary weights are unpacked to int8 first: this
  path is bound by arithmetic, not by weight bytes.
Both pad odd M and N to whole tiles; K must be a multiple of 128 (else `auto` uses the reference).

`auto` and `gpu` route only to these two (both exact on an H200, RESULTS_quantized_matmul.md). The
Triton GEMM below (Pallas' deprecated Triton backend, output-tiled int8 MMA) runs only when its
`GemmConfig` is passed explicitly (the benchmark's sweep): on an H200 its int32 accumulator was
exact, but its scaled outputs were wrong at M=3 (block_m 128, 4 warps; exact at M=300 with 8 warps),
so it refuses scaled outputs outside the combination that passed.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bitgen.kernels import quantized_matmul_gpu_gemm as mosaic_gemm
from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
from bitgen.kernels import ternary_pack

_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands (both K-major)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  block_m: int = 128
  block_n: int = 256
  block_k: int = 128
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 3


def default_config(m: int, k: int, n: int, ternary: bool):
  """The kernel (by its config type) and block sizes for a shape, or the reason no kernel fits."""
  gemv_config = gemv.default_config(m, k, n, ternary)
  if not isinstance(gemv_config, str):
    return gemv_config
  gemm_config = mosaic_gemm.default_config(k)
  if isinstance(gemm_config, str) and m <= gemv.MAX_M:
    return f"{gemv_config}; {gemm_config}"
  return gemm_config


def _epilogue(acc, x_scale, w_scale, out_dtype):
  """[rows, cols] int32 -> out_dtype; scales broadcast along rows and columns (None: int32 out)."""
  if x_scale is None:
    return acc
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)


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


def matmul(x, w, x_scale, w_scale, *, config, scaled: bool, out_dtype, interpret: bool = False):
  """x [M, K] int8; w [N, K] int8 or [N, K // 16] uint32 ternary; scales [M], [N] f32 (applied
  when `scaled`); `config` from `default_config` (the dispatcher in quantized_matmul.py checks it)."""
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  if isinstance(config, gemv.GemvConfig):
    return gemv.gemv(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
                     interpret=interpret)
  if ternary:  # compute-bound: unpack once to int8, then the int8 MMA.
    w = ternary_pack.unpack_ternary(w)
  if isinstance(config, mosaic_gemm.GemmConfig):
    return mosaic_gemm.gemm(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
                            interpret=interpret)
  if n % config.block_n or k % config.block_k:
    raise ValueError(f"the Triton GEMM needs N % block_n == 0 and K % block_k == 0, got N={n}, K={k} "
                     f"for {config}")
  if scaled and (m < config.block_m or config.num_warps != 8):
    raise ValueError(f"the Triton GEMM's scaled outputs were wrong on an H200 at M=3 with 4 warps; "
                     f"they need M >= block_m and num_warps=8, got M={m} for {config}")
  params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
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
