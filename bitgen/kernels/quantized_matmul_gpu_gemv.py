"""Decode GEMV (M <= 16) for `quantized_matmul` on Hopper, in Pallas Mosaic GPU (`plgpu`).

Memory-bound: every weight byte is read once. A CTA owns `ROWS` = 64 output channels (the wgmma M
of one warpgroup) and one of `split_k` slices of K; a multi-stage TMA pipeline (`emit_pipeline`)
streams its weight slab and the matching columns of x through shared memory, and each step feeds the
tensor cores with the weights as the M side ("swap AB": out^T [64, Mp] += w [64, k] @ x^T [k, Mp],
Mp = M rounded up to 8 or 16, x's missing rows zero-padded). Any N: a TMA block may not pass the
end of an array, so N is padded to whole blocks of 64 channels with zero weight rows (one copy of
the weights, only where N % 64 != 0) and the padded channels are sliced off the partials.

- int8 weights: the wgmma reads both operands from shared memory (K-major, 128-byte swizzle).
- ternary weights: a step loads one packing group (128 words of each row = 2048 values of K, see
  `ternary_pack`) from shared memory into registers, in the wgmma's 8-bit operand layout, and unpacks
  plane j = (words >> 2j) & 3 (the codes w + 1 of a contiguous run of 128 values of K) straight into
  an int8 register operand: no relayout, no shared-memory round trip. The registers only shift,
  mask and narrow: the kernel sums codes x x = w x x + sum_k x, and the caller subtracts the row
  sums of x (`minus_one_mma=True` does it in the kernel with a second wgmma of a constant -1).

The int32 partial sums of the K slices come out as [split_k, N, Mp]; the caller's XLA epilogue
sums them, transposes and applies the scales (one small fusion over 16 N values).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from bitgen.kernels import ternary_pack

MAX_M = 16
ROWS = 64  # output channels per CTA: the M of one Hopper wgmma
_SWIZZLE = 128  # bytes: one swizzle row is 128 int8 values of K
_GROUP_WORDS = ternary_pack.MAX_GROUP_WORDS  # 128 words = 2048 values: one pipeline step
_SM_COUNT = 132  # H100 / H200


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  block_k: int  # values of K a pipeline step (ternary: one packing group, 2048)
  split_k: int  # CTAs sharing a block of channels, each over K / split_k
  stages: int  # pipeline depth (steps in flight)
  minus_one_mma: bool = False  # ternary: remove the code offset with a -1 wgmma (else: see below)


def _split_k(k: int, n: int, block_k: int) -> int:
  """Slices of K until the CTAs cover the multiprocessors (small N needs more)."""
  split = 1
  while pl.cdiv(n, ROWS) * split < _SM_COUNT and k % (2 * split * block_k) == 0:
    split *= 2
  return split


def default_config(m: int, k: int, n: int, ternary: bool) -> GemvConfig | str:
  """The block sizes for a shape, or the reason this kernel cannot take it."""
  if m > MAX_M:
    return f"the GEMV takes M <= {MAX_M} rows, got M={m}"
  if ternary:
    block_k = ternary_pack.VALUES_PER_WORD * _GROUP_WORDS
    if k % block_k:
      return f"the ternary GEMV needs K a multiple of {block_k} (whole 128-word groups), got K={k}"
    return GemvConfig(block_k=block_k, split_k=_split_k(k, n, block_k), stages=3)
  block_k = next((b for b in (512, 256, 128) if k % b == 0), None)
  if block_k is None:
    return f"the int8 GEMV needs K a multiple of 128, got K={k}"
  return GemvConfig(block_k=block_k, split_k=_split_k(k, n, block_k), stages=6)


def x_row_sums(x: jax.Array) -> jax.Array:
  """[M, K] int8 -> [M] int32: what the codes (w + 1) of a ternary GEMV add to each output row."""
  return jnp.sum(x, axis=1, dtype=jnp.int32)


def gemv_partials(x: jax.Array, w: jax.Array, config: GemvConfig, *, interpret: bool = False) -> jax.Array:
  """x [M, K] int8, w [N, K] int8 or [N, K // 16] uint32 -> int32 partial sums [split_k, N, Mp].

  Columns >= M of the partials are the padding rows of x (zeros).

  For ternary w without `minus_one_mma` the partials sum to (w + 1) x^T: subtract `x_row_sums`.
  """
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  padded_m = 8 if m <= 8 else 16
  if m != padded_m:  # a TMA block may not pass the array's end: pad x's rows (a few KiB)
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  padded_n = pl.cdiv(n, ROWS) * ROWS
  if n != padded_n:  # the same for the weights' rows: padded channels are sliced off below
    return gemv_partials(x, jnp.pad(w, ((0, padded_n - n), (0, 0))), config, interpret=interpret)[:, :n]
  bk, splits = config.block_k, config.split_k
  k_slice = k // splits
  steps = k_slice // bk
  swizzled = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))
  x_spec = plgpu.BlockSpec((padded_m, bk), lambda t: (0, t), transforms=swizzled)
  if ternary:
    w = lax.bitcast_convert_type(w, jnp.int32)  # same bits; the kernel shifts and masks
    words = bk // ternary_pack.VALUES_PER_WORD
    w_spec = plgpu.BlockSpec((ROWS, words), lambda t: (0, t))  # plain: loaded into registers
    w_cols = k_slice // ternary_pack.VALUES_PER_WORD
  else:
    w_spec = plgpu.BlockSpec((ROWS, bk), lambda t: (0, t), transforms=swizzled)
    w_cols = k_slice

  def step(acc_ref, _, x_smem, w_smem):
    # x_smem [Mp, bk] int8 (swizzled); w_smem [64, bk] int8 (swizzled) or [64, 128] int32 words.
    if ternary:
      packed = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA_8BIT)  # [64, 128] int32
      minus_one = plgpu.layout_cast(jnp.full((ROWS, _GROUP_WORDS), -1, jnp.int8),
                                    plgpu.Layout.WGMMA_8BIT)
      for j in range(ternary_pack.VALUES_PER_WORD):
        codes = ((packed >> (ternary_pack.BITS_PER_VALUE * j)) & 3).astype(jnp.int8)  # w + 1
        x_plane = x_smem.at[:, pl.ds(j * _GROUP_WORDS, _GROUP_WORDS)].T  # [128, Mp], K-major
        plgpu.wgmma(acc_ref, codes, x_plane)
        if config.minus_one_mma:
          plgpu.wgmma(acc_ref, minus_one, x_plane)
    else:
      plgpu.wgmma(acc_ref, w_smem, x_smem.T)
    plgpu.wgmma_wait(0)

  def kernel(x_gmem, w_gmem, out_gmem):
    block, split = lax.axis_index("n"), lax.axis_index("k")
    rows = pl.ds(block * ROWS, ROWS)

    def scoped(acc_ref):
      pipeline = plgpu.emit_pipeline(
          lambda *args: step(acc_ref, *args), grid=(steps,), in_specs=[x_spec, w_spec],
          max_concurrent_steps=min(config.stages, steps))
      pipeline(x_gmem.at[:, pl.ds(split * k_slice, k_slice)],
               w_gmem.at[rows, pl.ds(split * w_cols, w_cols)])
      out_gmem.at[split, rows][...] = acc_ref[...]

    pl.run_scoped(scoped, plgpu.ACC((ROWS, padded_m), jnp.int32))

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((splits, n, padded_m), jnp.int32),
      grid=(n // ROWS, splits),
      grid_names=("n", "k"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(x, w)
