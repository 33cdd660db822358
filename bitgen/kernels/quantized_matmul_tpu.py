"""TPU kernels for `quantized_matmul` (Pallas, Mosaic TPU): int8 x int8 -> int32 on the MXU.

One output-tiled kernel with a K grid axis accumulating in a VMEM int32 scratch, for every M (the
weights stream through VMEM once per row tile, so for decode, M <= block_m, they are read once).
Ternary weights arrive packed; each K step unpacks 128 words at a time (2048 values, 4 packing
groups of 128 bytes, see `ternary_pack`) with two shifts of the whole words per (byte e, plane s)
(the 2-bit field to the top, then arithmetically down: the signed value) into int8 and feeds the MXU with the weights transposed (both operands K-major). Lane
32 g + q of (e, s) is K offset 512 g + 128 s + 4 q + e of the 2048: x's columns are permuted to
that order once outside the kernel (`_unpack_order`). The scales are applied when the last K step
writes the output tile.
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
_BYTES_PER_WORD = ternary_pack.VALUES_PER_WORD // ternary_pack.VALUES_PER_BYTE
_CHUNK_WORDS = _LANES  # words unpacked at a time: 4 packing groups of 128 bytes
_CHUNK_VALUES = _CHUNK_WORDS * ternary_pack.VALUES_PER_WORD


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
  if ternary:
    if k % _CHUNK_VALUES:
      return f"ternary TPU kernel needs K a multiple of {_CHUNK_VALUES} (128 words at a time), got K={k}"
    block_k = _largest_dividing(k, (2 * _CHUNK_VALUES, _CHUNK_VALUES))
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

  if ternary:  # x_ref's columns in `_unpack_order`
    acc = None
    for chunk in range(w_ref.shape[1] // _CHUNK_WORDS):
      words = w_ref[:, chunk * _CHUNK_WORDS:(chunk + 1) * _CHUNK_WORDS]  # [bn, 128]
      for e in range(_BYTES_PER_WORD):
        for s in range(ternary_pack.VALUES_PER_BYTE):
          top = 32 - ternary_pack.BITS_PER_VALUE - 8 * e - ternary_pack.BITS_PER_VALUE * s
          w_part = ((words << top) >> (32 - ternary_pack.BITS_PER_VALUE)).astype(jnp.int8)
          start = chunk * _CHUNK_VALUES + (e * ternary_pack.VALUES_PER_BYTE + s) * _LANES
          x_part = x_ref[:, start:start + _LANES]  # [bm, 128]
          part = lax.dot_general(x_part, w_part, _NT, preferred_element_type=jnp.int32)
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


def _unpack_order(x):
  """x [M, K] -> its columns in the order the kernel unpacks ternary words: in each 2048 of K,
  offset 512 g + 128 s + 4 q + e (g packing group, s plane, q word of the group, e byte of the word)
  moves to 512 e + 128 s + 32 g + q."""
  m, k = x.shape
  groups = _CHUNK_VALUES // (ternary_pack.VALUES_PER_BYTE * ternary_pack.MAX_GROUP_BYTES)
  words = ternary_pack.MAX_GROUP_BYTES // _BYTES_PER_WORD
  x = x.reshape(m, k // _CHUNK_VALUES, groups, ternary_pack.VALUES_PER_BYTE, words, _BYTES_PER_WORD)
  return x.transpose(0, 1, 5, 3, 2, 4).reshape(m, k)  # [M, chunk, e, s, g, q]


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
  if ternary:  # the same bits as int32: the kernel's right shifts are arithmetic
    w = lax.bitcast_convert_type(w, jnp.int32)
    x = _unpack_order(x)
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
