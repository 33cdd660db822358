"""Prefill / training GEMM for `quantized_matmul` on Hopper, in Pallas Mosaic GPU (`plgpu`).

int8 x int8 -> int32 on the tensor cores (wgmma s8.s8.s32; both operands K-major, as 8-bit wgmma
requires): a persistent grid of one CTA per multiprocessor walks the output tiles in a swizzled
(planar snake) order for L2 reuse; in each CTA a producer warpgroup streams x and w tiles through a
TMA ring (`emit_pipeline_warp_specialized`) while two consumer warpgroups each own half of the
output tile. Rows of x and of w (output channels) are zero-padded to whole tiles and the padding
is sliced off the output. The epilogue scales the int32 accumulator (per-token x scales,
per-channel w scales) in registers and writes the tile through shared memory with TMA.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_SWIZZLE = 128  # bytes: 128 int8 values of K per swizzle row
_SM_COUNT = 132  # H100 / H200


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  tile_m: int = 128  # rows of one consumer warpgroup; the CTA tile is (2 tile_m, tile_n)
  tile_n: int = 128
  tile_k: int = 128
  stages: int = 4  # TMA ring depth (48 KiB a stage); one less for int32 outputs (bigger epilogue)
  grid_tile_width: int = 8  # output tiles a snake column spans (L2 reuse)
  epi_tile: int = 64  # the epilogue writes (epi_tile, epi_tile) blocks, double-buffered
  wgmma_in_flight: int = 1  # wgmmas left running at the end of a step (their stages held back)


def default_config(k: int) -> GemmConfig | str:
  """Block sizes, or the reason the kernel cannot take the shape (any M and N: both are padded)."""
  config = GemmConfig()
  if k % config.tile_k:
    return f"the Mosaic GPU GEMM needs K % {config.tile_k} == 0, got K={k}"
  return config


def gemm(x, w, x_scale, w_scale, config: GemmConfig, *, scaled: bool, out_dtype,
         interpret: bool = False) -> jax.Array:
  """x [M, K] int8, w [N, K] int8, scales [M], [N] f32 -> [M, N] out_dtype (int32 unscaled)."""
  m, k = x.shape
  n = w.shape[0]
  out_dtype = jnp.dtype(out_dtype if scaled else jnp.int32)
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  cta_m = 2 * tile_m
  padded_m, padded_n = pl.cdiv(m, cta_m) * cta_m, pl.cdiv(n, tile_n) * tile_n
  if (padded_m, padded_n) != (m, n):  # a TMA block may not pass the array's end: pad, then slice
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    x_scale = jnp.pad(x_scale, (0, padded_m - m))
    w = jnp.pad(w, ((0, padded_n - n), (0, 0)))  # a copy of the weights, only where N % tile_n
    w_scale = jnp.pad(w_scale, (0, padded_n - n))
    return gemm(x, w, x_scale, w_scale, config, scaled=scaled, out_dtype=out_dtype,
                interpret=interpret)[:m, :n]
  m_iters, n_iters, k_iters = m // cta_m, n // tile_n, k // tile_k
  epi = config.epi_tile
  stages = config.stages - (out_dtype.itemsize > 2)
  swizzled = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))
  out_swizzle = plgpu.find_swizzle(epi * out_dtype.itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_dtype.itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, tile_k), lambda t: (0, t), transforms=swizzled,
                            memory_space=plgpu.SMEM, delay_release=config.wgmma_in_flight),
            plgpu.BlockSpec((tile_n, tile_k), lambda t: (0, t), transforms=swizzled,
                            memory_space=plgpu.SMEM, delay_release=config.wgmma_in_flight),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=stages,
        compute_context=compute_context,
    )

  def kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, out_gmem, out_smem, xs_smem, ws_smem, barrier):
    ignore = lambda *_, **__: None

    @functools.partial(pl.run_scoped,
                       allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
                       collective_axes="wg")
    def _scope(allocs):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tile_loop(info):
        (tile,) = info.index
        mi, ni = plgpu.planar_snake(tile, (m_iters, n_iters), 1, config.grid_tile_width)
        rows = pl.ds(mi * cta_m + wg * tile_m, tile_m)  # this consumer's rows
        cols = pl.ds(ni * tile_n, tile_n)

        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.int32))
          def _acc_scope(acc_ref):
            if scaled:  # the scales travel while the main loop runs
              plgpu.copy_gmem_to_smem(xs_gmem.at[rows], xs_smem.at[wg], barrier.at[wg])
              plgpu.copy_gmem_to_smem(ws_gmem.at[cols], ws_smem.at[wg], barrier.at[2 + wg])
            eval_pipeline(acc_ref)
            acc = acc_ref[...]  # [tile_m, tile_n] int32
            if scaled:
              plgpu.barrier_wait(barrier.at[wg])
              plgpu.barrier_wait(barrier.at[2 + wg])
              xs = plgpu.load(xs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
              ws = plgpu.load(ws_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
              acc = acc.astype(jnp.float32) * lax.broadcast_in_dim(xs, acc.shape, [0])
              acc = (acc * lax.broadcast_in_dim(ws, acc.shape, [1])).astype(out_dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for e in range((tile_m // epi) * (tile_n // epi)):
              er, ec = divmod(e, tile_n // epi)
              slot = e % 2
              plgpu.wait_smem_to_gmem(1, wait_read_only=True)
              out_smem[wg, slot] = acc[er * epi:(er + 1) * epi, ec * epi:(ec + 1) * epi]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, slot],
                  out_gmem.at[rows, cols].at[pl.ds(er * epi, epi), pl.ds(ec * epi, epi)])

        def mma(_, x_smem, w_smem, acc_ref):
          plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * tile_m, tile_m)], w_smem.T)
          plgpu.wgmma_wait(config.wgmma_in_flight)  # the tensor cores overlap consecutive steps
          return acc_ref

        get_pipeline(mma, compute_context)(
            x_gmem.at[pl.ds(mi * cta_m, cta_m), :], w_gmem.at[cols, :], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(min(_SM_COUNT, m_iters * n_iters),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      scratch_types=dict(
          out_smem=plgpu.SMEM((2, 2, epi, epi), out_dtype, transforms=out_transforms),
          xs_smem=plgpu.SMEM((2, tile_m), jnp.float32),
          ws_smem=plgpu.SMEM((2, tile_n), jnp.float32),
          barrier=plgpu.Barrier(num_barriers=4),
      ),
  )(x, w, x_scale, w_scale)
