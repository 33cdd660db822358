"""Decode GEMV (M <= 16) for `quantized_matmul` on Hopper, in Pallas Mosaic GPU (`plgpu`).

Memory-bound: every weight byte is read once. A CTA owns `ROWS` = 64 output channels (the wgmma M
of one warpgroup) and one of `split_k` slices of K; a multi-stage TMA pipeline (`emit_pipeline`)
streams its weight slab and the matching columns of x through shared memory, and each step feeds the
tensor cores with the weights as the M side ("swap AB": out^T [64, Mp] += w [64, k] @ x^T [k, Mp],
Mp = M rounded up to 8 or 16, x's missing rows zero-padded). Any N: a TMA block may not pass the
end of an array, so N is padded to whole blocks of 64 channels with zero weight rows (one copy of
the weights, only where N % 64 != 0) and the padded channels are sliced off.

- int8 weights: the wgmma reads both operands from shared memory (K-major, 128-byte swizzle).
- ternary weights: a step loads one packing group (128 words of each row = 2048 values of K, see
  `ternary_pack`) from shared memory into registers, 4 consecutive words a thread, in the wgmma's
  8-bit operand layout. Byte b of the 4 words is gathered into one register (a 4 x 4 byte transpose:
  8 `prmt`s), so a register holds the codes of planes 4b..4b+3 at 4 consecutive K; plane
  j = 4b + i is then `((r >> 2i) & 0x03030303) + 0x7f7f7f7f ^ 0x80808080` (per byte: code - 1, the
  weight in {-1, 0, 1}, no borrow across bytes): 4 integer ops a register of 4 weights, straight
  into the int8 register operand. The 4 planes of one byte are 512 contiguous values of K: one
  wgmma (16 k32 instructions) against x's matching columns, 4 a step. Measured: 14.4 us at M=8,
  K=N=8192 on an H200, about 3x the memory floor (RESULTS_quantized_matmul.md).

With `split_k == 1` the kernel ends the whole product: the int32 accumulator [64, Mp] is scaled
(x_scale[m] then w_scale[n], as the reference) and stored transposed into out [M, N] from
registers. With `split_k > 1` the int32 partial sums come out as [split_k, N, Mp] and the caller
sums, transposes and scales them (one small XLA fusion).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref, vector
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from bitgen.kernels import ternary_pack

MAX_M = 16
ROWS = 64  # output channels per CTA: the M of one Hopper wgmma
_SWIZZLE = 128  # bytes: one swizzle row is 128 int8 values of K
_GROUP_WORDS = ternary_pack.MAX_GROUP_WORDS  # 128 words = 2048 values: one pipeline step
_SM_COUNT = 132  # H100 / H200
_BYTES = 4  # int8 values in a 32-bit register


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  block_k: int  # values of K a pipeline step (ternary: one packing group, 2048)
  split_k: int  # CTAs sharing a block of channels, each over K / split_k (1: scaled out in-kernel)
  stages: int  # pipeline depth (steps in flight)


def _split_k(k: int, n: int, block_k: int) -> int:
  """Slices of K until the CTAs cover half the multiprocessors (else one slice: no XLA epilogue)."""
  split = 1
  while pl.cdiv(n, ROWS) * split < _SM_COUNT // 2 and k % (2 * split * block_k) == 0:
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


def _i32(value: int):
  return arith.constant(ir.IntegerType.get_signless(32), ir.IntegerAttr.get(
      ir.IntegerType.get_signless(32), value - (1 << 32) if value >= 1 << 31 else value))


def _prmt(a, b, selector: int):
  """PTX prmt.b32: result byte i = byte (selector >> 4 i) & 7 of {b:a} (a: bytes 0-3, b: 4-7)."""
  return mgpu_utils.inline_ptx("prmt.b32 $0, $1, $2, $3;", a, b, _i32(selector),
                               result_types=ir.IntegerType.get_signless(32))


_INT8_OPERAND = plgpu.Layout.WGMMA_8BIT
_OPERAND_TYPE = plgpu.ShapeDtypeStruct((ROWS, _GROUP_WORDS), jnp.int8, layout=_INT8_OPERAND)


@plgpu.inline_mgpu(arg_types=(_INT8_OPERAND,), return_type=(_OPERAND_TYPE,) * _BYTES)
def _gather_bytes(_, words):
  """[64, 128] int32 words (4 consecutive a thread) -> 4 x [64, 128] int8: byte b of each word."""
  i8x4 = ir.VectorType.get((_BYTES,), ir.IntegerType.get_signless(8))
  planes = [np.empty(words.registers.shape, dtype=object) for _ in range(_BYTES)]
  for idx, reg in np.ndenumerate(words.registers):  # reg: vector<4xi32>, words q0..q3 of a row
    q = [vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([v]))
         for v in range(_BYTES)]
    low01, high01 = _prmt(q[0], q[1], 0x5140), _prmt(q[0], q[1], 0x7362)  # q0.0 q1.0 q0.1 q1.1 / .2 .3
    low23, high23 = _prmt(q[2], q[3], 0x5140), _prmt(q[2], q[3], 0x7362)
    gathered = (_prmt(low01, low23, 0x5410), _prmt(low01, low23, 0x7632),
                _prmt(high01, high23, 0x5410), _prmt(high01, high23, 0x7632))
    for b in range(_BYTES):
      planes[b][idx] = mgpu_utils.bitcast(gathered[b], i8x4)
  return tuple(mgpu.FragmentedArray(_registers=p, _layout=words.layout, _is_signed=True) for p in planes)


_PLANES_TYPE = plgpu.ShapeDtypeStruct((ROWS, _BYTES * _GROUP_WORDS), jnp.int8, layout=_INT8_OPERAND)


@plgpu.inline_mgpu(arg_types=(_INT8_OPERAND,), return_type=_PLANES_TYPE)
def _planes(_, gathered):
  """Byte b of the words [64, 128] -> the int8 weights {-1, 0, 1} of planes 4b..4b+3 [64, 512].

  Plane 4b + i sits at bits 2i of each byte; the planes are contiguous runs of K, so the 4 of one
  byte are 512 contiguous values of K: one wgmma against 512 columns of x.
  """
  i32 = ir.IntegerType.get_signless(32)
  planes = []
  for shift in range(_BYTES):
    out = gathered.registers.copy()
    for idx, reg in enumerate(gathered.registers.flat):
      r = mgpu_utils.bitcast(reg, i32)
      if shift:
        r = arith.shrui(r, _i32(2 * shift))
      r = arith.andi(r, _i32(0x03030303))
      r = arith.xori(arith.addi(r, _i32(0x7F7F7F7F)), _i32(0x80808080))  # per byte: code - 1
      out.flat[idx] = mgpu_utils.bitcast(r, reg.type)
    planes.append(out)
  # Register axis 1 counts the 16-column tiles of the operand: the planes follow each other in K.
  return mgpu.FragmentedArray(_registers=np.concatenate(planes, axis=1), _layout=gathered.layout,
                              _is_signed=True)


def _store_transposed(acc, x_scale, w_scale, out, *, m: int, scaled: bool):
  """acc [64, Mp] int32 (channels x rows) -> out [m, 64] (scaled: acc * x_scale[m] * w_scale[n])."""
  refs = (plgpu.RefType(),) * 3

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, *refs))
  def store(_, acc, xs_ref, ws_ref, out_ref):
    index, f32 = ir.IndexType.get(), ir.F32Type.get()
    out_type = ir.MemRefType(out_ref.type).element_type
    [vec_len] = ir.VectorType(acc.registers.flat[0].type).shape
    for reg, (row, col) in zip(acc.registers.flat, acc.layout.thread_idxs(acc.shape)):
      for e in range(vec_len):
        value = vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([e]))
        col_e = arith.addi(col, arith.constant(index, e))
        in_bounds = arith.cmpi(arith.CmpIPredicate.ult, col_e, arith.constant(index, m))
        with mgpu_utils.when(in_bounds):  # columns >= m of acc are x's padding rows
          if scaled:
            value = arith.mulf(arith.sitofp(f32, value), memref.load(xs_ref, [col_e]))
            value = arith.mulf(value, memref.load(ws_ref, [row]))
            if out_type != f32:
              value = arith.truncf(out_type, value)
          memref.store(value, out_ref, [col_e, row])

  store(plgpu.layout_cast(acc, plgpu.Layout.WGMMA), x_scale, w_scale, out)


def gemv(x: jax.Array, w: jax.Array, x_scale: jax.Array, w_scale: jax.Array, config: GemvConfig, *,
         scaled: bool, out_dtype, interpret: bool = False) -> jax.Array:
  """x [M, K] int8, w [N, K] int8 or [N, K // 16] uint32 ternary, scales [M], [N] f32 -> [M, N].

  out_dtype when `scaled`, else the exact int32 product. Interpret mode (CPU tests) cannot run the
  register-level code: there only the int8 weights and the partial-sum path (`split_k > 1`'s XLA
  epilogue) run.
  """
  m = x.shape[0]
  n = w.shape[0]
  out_dtype = jnp.dtype(out_dtype if scaled else jnp.int32)
  padded_n = pl.cdiv(n, ROWS) * ROWS
  if n != padded_n:  # a TMA block may not pass the array's end: zero channels, sliced off below
    w = jnp.pad(w, ((0, padded_n - n), (0, 0)))
    w_scale = jnp.pad(w_scale, (0, padded_n - n))
  if config.split_k > 1 or interpret:
    partials = _gemv_call(x, w, None, None, config, scaled=False, out_dtype=jnp.int32,
                          interpret=interpret)  # [S, N, Mp]
    acc = jnp.sum(partials, axis=0)[:n, :m].T  # [M, N]; columns >= M of the partials are padding
    if not scaled:
      return acc
    return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :n]).astype(out_dtype)
  out = _gemv_call(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
                   interpret=interpret)  # [M, padded N]
  return out if n == padded_n else out[:, :n]


def _gemv_call(x, w, x_scale, w_scale, config: GemvConfig, *, scaled: bool, out_dtype, interpret):
  """The kernel: [M, N] out_dtype with one K slice (in-kernel epilogue), else [S, N, Mp] int32."""
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  padded_m = 8 if m <= 8 else 16
  if m != padded_m:  # a TMA block may not pass the array's end: pad x's rows (a few KiB)
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  bk, splits = config.block_k, config.split_k
  fused = splits == 1 and not interpret
  k_slice = k // splits
  steps = k_slice // bk
  swizzled = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))
  x_spec = plgpu.BlockSpec((padded_m, bk), lambda t: (0, t), transforms=swizzled)
  if ternary:
    w = lax.bitcast_convert_type(w, jnp.int32)  # same bits; the kernel gathers bytes and masks
    words = bk // ternary_pack.VALUES_PER_WORD
    w_spec = plgpu.BlockSpec((ROWS, words), lambda t: (0, t))  # plain: loaded into registers
    w_cols = k_slice // ternary_pack.VALUES_PER_WORD
  else:
    w_spec = plgpu.BlockSpec((ROWS, bk), lambda t: (0, t), transforms=swizzled)
    w_cols = k_slice

  def step(acc_ref, _, x_smem, w_smem):
    # x_smem [Mp, bk] int8 (swizzled); w_smem [64, bk] int8 (swizzled) or [64, 128] int32 words.
    if ternary:
      gathered = _gather_bytes(plgpu.load(w_smem, layout=_INT8_OPERAND))
      for b in range(_BYTES):  # planes 4b..4b+3: x's columns [512 b, 512 (b + 1)), K-major
        x_planes = x_smem.at[:, pl.ds(b * _BYTES * _GROUP_WORDS, _BYTES * _GROUP_WORDS)].T
        plgpu.wgmma(acc_ref, _planes(gathered[b]), x_planes)
    else:
      plgpu.wgmma(acc_ref, w_smem, x_smem.T)
    plgpu.wgmma_wait(0)

  def kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, out_gmem):
    block, split = lax.axis_index("n"), lax.axis_index("k")
    rows = pl.ds(block * ROWS, ROWS)

    def scoped(acc_ref):
      pipeline = plgpu.emit_pipeline(
          lambda *args: step(acc_ref, *args), grid=(steps,), in_specs=[x_spec, w_spec],
          max_concurrent_steps=min(config.stages, steps))
      pipeline(x_gmem.at[:, pl.ds(split * k_slice, k_slice)],
               w_gmem.at[rows, pl.ds(split * w_cols, w_cols)])
      if fused:
        _store_transposed(acc_ref[...], xs_gmem, ws_gmem.at[rows], out_gmem.at[:, rows], m=m,
                          scaled=scaled)
      else:
        out_gmem.at[split, rows][...] = acc_ref[...]

    pl.run_scoped(scoped, plgpu.ACC((ROWS, padded_m), jnp.int32))

  if fused:
    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    operands = (x, w, x_scale if scaled else jnp.ones((m,), jnp.float32),
                w_scale if scaled else jnp.ones((n,), jnp.float32))
  else:
    out_type = jax.ShapeDtypeStruct((splits, n, padded_m), jnp.int32)
    operands = (x, w, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32))  # unused
  return plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(n // ROWS, splits),
      grid_names=("n", "k"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*operands)
