"""Decode GEMV (M <= 16) for `quantized_matmul` on Hopper, in Pallas Mosaic GPU (`plgpu`).

Memory-bound: every weight byte is read once. A CTA owns `ROWS` = 64 output channels (the wgmma M
of one warpgroup) and one of `split_k` slices of K; a multi-stage TMA pipeline (`emit_pipeline`)
streams its weight slab and the matching columns of x through shared memory, and each step feeds the
tensor cores with the weights as the M side ("swap AB": out^T [64, Mp] += w [64, k] @ x^T [k, Mp],
Mp = M rounded up to 8 or 16, x's missing rows zero-padded). Any N: a TMA block may not pass the
end of an array, so N is padded to whole blocks of 64 channels with zero weight rows (one copy of
the weights, only where N % 64 != 0) and the padded channels are sliced off.

- int8 weights: the wgmma reads both operands from shared memory (K-major, 128-byte swizzle).
- ternary weights (`_ternary_call`): a warp-specialized kernel: a producer warpgroup streams four
  packing groups a step (4 x 128 bytes of each row = 2048 values of K, see `ternary_pack`, and x's
  matching columns) through a TMA ring into 128-byte swizzled tiles; `warpgroups` consumer
  warpgroups each load 4 / warpgroups of the step's groups into registers in the wgmma's 8-bit
  operand layout (4 consecutive bytes a thread, conflict-free through the swizzle), so a register
  holds planes 0..3 of the group at 4 consecutive K, and a shift and an AND move plane s to the top
  bits of each byte: the signed byte 64 w, straight into the register operand. One wgmma a group
  (its 512 contiguous values of K) into an accumulator of 64 w x, shifted back exactly at the end.
  The consumers' accumulators are summed through shared memory. Measured numbers and the variants
  tried: RESULTS_quantized_matmul.md.

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
_GROUP_BYTES = ternary_pack.MAX_GROUP_BYTES  # 128 bytes of a row = 512 values: 4 planes of 128
_STEP_GROUPS = 4  # ternary packing groups a pipeline step (2048 values of K)
_SM_COUNT = 132  # H100 / H200
_PRODUCER_REGISTERS = 40  # a thread of the ternary GEMV's TMA warpgroup (`setmaxnreg`)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  block_k: int  # values of K a pipeline step (ternary: one packing group, 2048)
  split_k: int  # CTAs sharing a block of channels, each over K / split_k (1: scaled out in-kernel)
  stages: int  # pipeline depth (steps in flight)
  warpgroups: int = 1  # ternary: consumer warpgroups, each unpacking 4 / warpgroups groups a step


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
    block_k = ternary_pack.VALUES_PER_BYTE * _GROUP_BYTES * _STEP_GROUPS
    if k % block_k:
      return f"the ternary GEMV needs K a multiple of {block_k} (4 whole 128-byte groups), got K={k}"
    if k > _MAX_TERNARY_K:
      return f"the ternary GEMV's int32 accumulator (64 w x) holds K <= {_MAX_TERNARY_K}, got K={k}"
    return GemvConfig(block_k=block_k, split_k=_split_k(k, n, block_k), stages=3, warpgroups=2)
  block_k = next((b for b in (512, 256, 128) if k % b == 0), None)
  if block_k is None:
    return f"the int8 GEMV needs K a multiple of 128, got K={k}"
  return GemvConfig(block_k=block_k, split_k=_split_k(k, n, block_k), stages=6)


def _i32(value: int):
  return arith.constant(ir.IntegerType.get_signless(32), ir.IntegerAttr.get(
      ir.IntegerType.get_signless(32), value - (1 << 32) if value >= 1 << 31 else value))


_INT8_OPERAND = plgpu.Layout.WGMMA_8BIT
# Bit pair s of each byte, shifted to the byte's top bits and masked, is the signed byte 64 w: one
# accumulator takes all four planes of a group (the 512 contiguous values of K), scaled by 64.
_PLANE_SCALE_BITS = 6
_TOP_BIT_PAIRS = 0xC0C0C0C0
_MAX_TERNARY_K = 1 << 17  # |64 w x| summed over K stays below 2^31


def _operand_type(k: int):
  return plgpu.ShapeDtypeStruct((ROWS, k), jnp.int8, layout=_INT8_OPERAND)


def _weights(group):
  """A packing group's bytes [64, 128] -> its weights times 64, [64, 512] (planes 0..3 in K order).

  Each register holds 4 consecutive bytes of a row (the 8-bit operand layout); plane s of them is
  (r << (6 - 2 s)) & 0xC0C0C0C0: two ops a register of 4 weights (one for s = 3).
  """
  @plgpu.inline_mgpu(arg_types=(_INT8_OPERAND,),
                     return_type=_operand_type(ternary_pack.VALUES_PER_BYTE * _GROUP_BYTES))
  def weights(_, group):
    i32 = ir.IntegerType.get_signless(32)
    planes = []
    for s in range(ternary_pack.VALUES_PER_BYTE):
      shift = _PLANE_SCALE_BITS - ternary_pack.BITS_PER_VALUE * s
      out = group.registers.copy()
      for idx, reg in enumerate(group.registers.flat):
        r = mgpu_utils.bitcast(reg, i32)
        if shift:
          r = arith.shli(r, _i32(shift))
        out.flat[idx] = mgpu_utils.bitcast(arith.andi(r, _i32(_TOP_BIT_PAIRS)), reg.type)
      planes.append(out)
    # Register axis 1 counts the 16-column tiles of the operand: the planes follow each other in K.
    return mgpu.FragmentedArray(_registers=np.concatenate(planes, axis=1), _layout=group.layout,
                                _is_signed=True)

  return weights(group)


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
  call = _ternary_call if w.dtype == jnp.uint32 else _int8_call
  if config.split_k > 1 or interpret:
    partials = call(x, w, None, None, config, scaled=False, out_dtype=jnp.int32,
                    interpret=interpret)  # [S, N, Mp]
    acc = jnp.sum(partials, axis=0)[:n, :m].T  # [M, N]; columns >= M of the partials are padding
    if not scaled:
      return acc
    return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :n]).astype(out_dtype)
  out = call(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
             interpret=interpret)  # [M, padded N]
  return out if n == padded_n else out[:, :n]


def _operands(x, w, x_scale, w_scale, config: GemvConfig, *, scaled: bool, out_dtype, fused: bool):
  """x padded to 8 or 16 rows, the output type and the kernel's operands (unused scales: dummies)."""
  m = x.shape[0]
  n = w.shape[0]
  padded_m = 8 if m <= 8 else 16
  if m != padded_m:  # a TMA block may not pass the array's end: pad x's rows (a few KiB)
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  if w.dtype == jnp.uint32:  # the same memory as the rows' bytes [N, K // 4] (`ternary_pack`)
    w = lax.bitcast_convert_type(w, jnp.int8).reshape(n, -1)
  if fused:
    return (jax.ShapeDtypeStruct((m, n), out_dtype),
            (x, w, x_scale if scaled else jnp.ones((m,), jnp.float32),
             w_scale if scaled else jnp.ones((n,), jnp.float32)))
  return (jax.ShapeDtypeStruct((config.split_k, n, padded_m), jnp.int32),
          (x, w, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32)))  # unused scales


def _int8_call(x, w, x_scale, w_scale, config: GemvConfig, *, scaled: bool, out_dtype, interpret):
  """The int8 kernel: [M, N] out_dtype with one K slice (in-kernel epilogue), else [S, N, Mp] int32."""
  m, k = x.shape
  n = w.shape[0]
  bk, splits = config.block_k, config.split_k
  fused = splits == 1 and not interpret
  out_type, operands = _operands(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
                                 fused=fused)
  padded_m = operands[0].shape[0]
  k_slice = k // splits
  swizzled = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))
  x_spec = plgpu.BlockSpec((padded_m, bk), lambda t: (0, t), transforms=swizzled)
  w_spec = plgpu.BlockSpec((ROWS, bk), lambda t: (0, t), transforms=swizzled)

  def step(acc_ref, _, x_smem, w_smem):  # x_smem [Mp, bk], w_smem [64, bk] int8 (swizzled)
    plgpu.wgmma(acc_ref, w_smem, x_smem.T)
    plgpu.wgmma_wait(0)

  def kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, out_gmem):
    block, split = lax.axis_index("n"), lax.axis_index("k")
    rows = pl.ds(block * ROWS, ROWS)

    def scoped(acc_ref):
      pipeline = plgpu.emit_pipeline(
          lambda *args: step(acc_ref, *args), grid=(k_slice // bk,), in_specs=[x_spec, w_spec],
          max_concurrent_steps=min(config.stages, k_slice // bk))
      pipeline(x_gmem.at[:, pl.ds(split * k_slice, k_slice)],
               w_gmem.at[rows, pl.ds(split * k_slice, k_slice)])
      if fused:
        _store_transposed(acc_ref[...], xs_gmem, ws_gmem.at[rows], out_gmem.at[:, rows], m=m,
                          scaled=scaled)
      else:
        out_gmem.at[split, rows][...] = acc_ref[...]

    pl.run_scoped(scoped, plgpu.ACC((ROWS, padded_m), jnp.int32))

  return plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(n // ROWS, splits),
      grid_names=("n", "k"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*operands)


def _register_split(consumers: int) -> tuple[int, int]:
  """(producer, consumer) registers a thread for `setmaxnreg`, within what the launch allocated.

  ptxas gives each of the (consumers + 1) * 128 threads 64 Ki / threads registers (a multiple of 8,
  at most 255); a consumer's `setmaxnreg.inc` blocks until the producer's decrease has freed enough,
  so more than that pool in total would hang the kernel.
  """
  threads = 128 * (consumers + 1)
  pool = min(255, 65536 // threads) // 8 * 8 * (consumers + 1)
  return _PRODUCER_REGISTERS, min(256, (pool - _PRODUCER_REGISTERS) // consumers // 8 * 8)


def _ternary_call(x, w, x_scale, w_scale, config: GemvConfig, *, scaled: bool, out_dtype,
                  interpret):
  """The ternary kernel (same outputs as `_int8_call`): a producer warpgroup streams x and the packed
  bytes through a TMA ring; `config.warpgroups` consumers each unpack 4 / warpgroups of every step's
  packing groups and keep their own accumulators, summed through shared memory at the end.

  The ring is written out here rather than taken from `emit_pipeline_warp_specialized`: its steps
  (4 at K=8192) are unrolled, and the register split is the one `_register_split` derives.
  The accumulator takes the weights times 64 (`_weights`).
  """
  if interpret:
    raise NotImplementedError("the ternary GEMV's register-level code has no interpret mode")
  m, k = x.shape
  n = w.shape[0]
  splits, consumers = config.split_k, config.warpgroups
  if consumers not in (1, 2):
    raise ValueError(f"the ternary GEMV takes 1 or 2 consumer warpgroups, got {consumers}")
  fused = splits == 1
  out_type, operands = _operands(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
                                 fused=fused)
  padded_m = operands[0].shape[0]
  k_slice = k // splits
  step_bytes = config.block_k // ternary_pack.VALUES_PER_BYTE  # of a row: _STEP_GROUPS groups
  steps = k_slice // config.block_k
  stages = min(config.stages, steps)
  group_count = _STEP_GROUPS // consumers  # packing groups of a step a consumer unpacks
  producer_regs, consumer_regs = _register_split(consumers)

  group_values = ternary_pack.VALUES_PER_BYTE * _GROUP_BYTES

  def step(w_smem, x_smem, acc_ref):
    # x_smem [Mp, 2048], w_smem [64, 512] int8 (both swizzled).
    wg = lax.axis_index("wg")
    for i in range(group_count):  # group g: x's columns [512 g, 512 (g + 1))
      g = wg * group_count + i
      group_start = pl.multiple_of(g * _GROUP_BYTES, _GROUP_BYTES)
      group = plgpu.load(w_smem.at[:, pl.ds(group_start, _GROUP_BYTES)], layout=_INT8_OPERAND)
      x_group = x_smem.at[:, pl.ds(pl.multiple_of(g * group_values, group_values), group_values)]
      plgpu.wgmma(acc_ref, _weights(group), x_group.T)

  def kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, out_gmem, w_ring, x_ring, produced, consumed,
             sums_smem, sums_barrier):
    block, split = lax.axis_index("n"), lax.axis_index("k")
    wg = lax.axis_index("wg")
    rows = pl.ds(block * ROWS, ROWS)

    def finish(acc):  # [64, Mp] int32, this consumer's share
      if consumers == 1:
        return epilogue(acc)

      @pl.when(wg > 0)
      def _():
        sums_smem[wg - 1] = acc
        plgpu.barrier_arrive(sums_barrier)

      @pl.when(wg == 0)
      def _():
        plgpu.barrier_wait(sums_barrier)
        total = acc
        for i in range(consumers - 1):
          total = total + plgpu.load(sums_smem.at[i], layout=plgpu.Layout.WGMMA)
        epilogue(total)

    def epilogue(acc):
      if fused:
        _store_transposed(acc, xs_gmem, ws_gmem.at[rows], out_gmem.at[:, rows], m=m, scaled=scaled)
      else:
        out_gmem.at[split, rows][...] = acc

    @pl.when(wg == consumers)
    def _producer():
      plgpu.set_max_registers(producer_regs, action="decrease")
      for t in range(steps):
        slot = t % stages
        if t >= stages:  # the consumers are done with step t - stages
          plgpu.barrier_wait(consumed.at[slot])
        w_columns = pl.ds((split * steps + t) * step_bytes, step_bytes)
        plgpu.copy_gmem_to_smem(w_gmem.at[rows, w_columns], w_ring.at[slot], produced.at[slot])
        columns = pl.ds(split * k_slice + t * config.block_k, config.block_k)
        plgpu.copy_gmem_to_smem(x_gmem.at[:, columns], x_ring.at[slot], produced.at[slot])

    @pl.when(wg < consumers)
    def _consumers():
      plgpu.set_max_registers(consumer_regs, action="increase")

      def scoped(acc_ref):
        for t in range(steps):
          slot = t % stages
          plgpu.barrier_wait(produced.at[slot])
          step(w_ring.at[slot], x_ring.at[slot], acc_ref)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(consumed.at[slot])
        # exact: every product in the accumulator is a multiple of 64
        finish(plgpu.layout_cast(acc_ref[...] >> _PLANE_SCALE_BITS, plgpu.Layout.WGMMA))

      pl.run_scoped(scoped, plgpu.ACC((ROWS, padded_m), jnp.int32))

  swizzled = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))
  return plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(n // ROWS, splits),
      grid_names=("n", "k"),
      num_threads=consumers + 1,
      thread_name="wg",
      scratch_types=dict(
          w_ring=plgpu.SMEM((stages, ROWS, step_bytes), jnp.int8, transforms=swizzled),
          x_ring=plgpu.SMEM((stages, padded_m, config.block_k), jnp.int8, transforms=swizzled),
          produced=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # the weights' and x's TMAs
          consumed=plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
          sums_smem=plgpu.SMEM((max(consumers - 1, 1), ROWS, padded_m), jnp.int32),
          sums_barrier=plgpu.Barrier(num_arrivals=max(consumers - 1, 1)),
      ),
  )(*operands)
