"""TPU kernels for `quantized_matmul` (Pallas, Mosaic TPU): int8 x int8 -> int32 on the MXU.

One output-tiled kernel with a K grid axis accumulating in a VMEM int32 scratch, for every M (the
weights stream through VMEM once per row tile, so for decode, M <= block_m, they are read once).
Ternary weights arrive packed; each K step unpacks whole packing groups (128 words = 2048 values)
plane by plane (see `ternary_pack`) into int8 and feeds the MXU with the weights transposed
(both operands K-major). The scales are applied when the last K step writes the output tile.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bitgen.kernels import ternary_pack

_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands
_LANES = 128


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  block_m: int = 256
  block_n: int = 512
  block_k: int = 2048  # values of K per step; for ternary weights a multiple of 2048 (one group)


def _largest_dividing(n: int, candidates) -> int | None:
  return next((c for c in candidates if n % c == 0), None)


def default_config(m: int, k: int, n: int, ternary: bool) -> TpuConfig | str:
  """Block sizes for a shape, or the reason no kernel fits it."""
  # A block spanning a whole axis needs no (8 | 32, 128) alignment.
  block_n = _largest_dividing(n, (512, 256, 128)) or (n if n <= 512 else None)
  if block_n is None:
    return f"TPU kernel needs N <= 512 or a multiple of {_LANES}, got N={n}"
  group = ternary_pack.VALUES_PER_WORD * ternary_pack.MAX_GROUP_WORDS
  if ternary:
    if k % group:
      return f"ternary TPU kernel needs K a multiple of {group} (whole 128-word groups), got K={k}"
    block_k = _largest_dividing(k, (2 * group, group))
  else:
    block_k = _largest_dividing(k, (2048, 1024, 512, 256, 128)) or (k if k <= 2048 else None)
    if block_k is None:
      return f"int8 TPU kernel needs K <= 2048 or a multiple of {_LANES}, got K={k}"
  block_m = m if m <= 512 else 256
  return TpuConfig(block_m=block_m, block_n=block_n, block_k=block_k)


def _kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref, *, ternary, scaled):
  # x_ref [bm, bk] int8; w_ref [bn, bk // 16] int32 words or [bn, bk] int8;
  # xs_ref [bm, 1], ws_ref [1, bn] f32; o_ref [bm, bn]; acc_ref [bm, bn] int32.
  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  if ternary:
    g = ternary_pack.MAX_GROUP_WORDS
    group_values = ternary_pack.VALUES_PER_WORD * g
    acc = None
    for group in range(w_ref.shape[1] // g):
      words = w_ref[:, group * g:(group + 1) * g]  # [bn, G]
      for j in range(ternary_pack.VALUES_PER_WORD):
        # Plane j of the group: K offsets [j G, (j + 1) G), codes minus 1.
        w_plane = (((words >> (ternary_pack.BITS_PER_VALUE * j)) & 3) - 1).astype(jnp.int8)
        start = group * group_values + j * g
        x_plane = x_ref[:, start:start + g]  # [bm, G]
        part = lax.dot_general(x_plane, w_plane, _NT, preferred_element_type=jnp.int32)
        acc = part if acc is None else acc + part
    acc_ref[...] += acc
  else:
    acc_ref[...] += lax.dot_general(x_ref[...], w_ref[...], _NT, preferred_element_type=jnp.int32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _write():
    acc = acc_ref[...]
    if scaled:
      o_ref[...] = (acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]).astype(o_ref.dtype)
    else:
      o_ref[...] = acc


def matmul(x, w, x_scale, w_scale, *, config, scaled: bool, out_dtype, interpret: bool = False):
  """x [M, K] int8; w [N, K] int8 or [N, K // 16] uint32 ternary; scales [M], [N] f32 (applied
  when `scaled`); `config` from `default_config` (the dispatcher in quantized_matmul.py checks it)."""
  m, k = x.shape
  n = w.shape[0]
  ternary = w.dtype == jnp.uint32
  bm, bn, bk = config.block_m, config.block_n, config.block_k
  padded_m = pl.cdiv(m, bm) * bm
  if padded_m != m:
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    x_scale = jnp.pad(x_scale, (0, padded_m - m))
  if ternary:  # the same bits as int32: the kernel only shifts right and masks 2 bits.
    w = lax.bitcast_convert_type(w, jnp.int32)
    w_spec = pl.BlockSpec((bn, bk // ternary_pack.VALUES_PER_WORD), lambda i, j, kk: (j, kk))
  else:
    w_spec = pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
  out = pl.pallas_call(
      lambda *refs: _kernel(*refs, ternary=ternary, scaled=scaled),
      out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(padded_m // bm, n // bn, k // bk),
          in_specs=[
              pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
              w_spec,
              pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
              pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
          ],
          out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="ternary_matmul" if ternary else "int8_matmul",
  )(x, w, x_scale[:, None], w_scale[None, :])
  return out[:m]
