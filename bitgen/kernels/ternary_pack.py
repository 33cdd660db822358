"""Packed ternary (b1.58) weights: 2 bits a value, 16 values a uint32 word, K-major (N, K) layout.

A ternary matrix `w` (N, K) with values in {-1, 0, +1} is stored as `(N, K // 16)` uint32 words, each
row K-contiguous ("K-major", the layout Hopper's int8 MMA and the TPU's transposed-RHS matmul read).
Each value is stored as its 2-bit two's complement code `w & 3` in {0b00, 0b01, 0b11} (0b10 is not
used), so a field moved to the top of a signed byte or word is the value times a power of two.

The layout is defined on the bytes of a row (K // 4 of them; byte `4 i + e` is bits `[8 e, 8 e + 8)`
of word `i`). They come in groups of `B = group_bytes(K)` bytes (the largest power of two <= 128
dividing K // 4) covering `4 B` consecutive values: bits `[2 s, 2 s + 2)` of byte `i` of a group hold
the value at offset `s B + i` of that group. Masking bit pair `s` of a group's B bytes thus yields
the contiguous run `[s B, (s + 1) B)` ("plane" s) with the values in byte order:
- a GPU thread holding 4 consecutive bytes in a register (the int8 MMA's operand layout) gets plane s
  at 4 consecutive K as signed bytes 64 w with a shift and an AND, no shuffles;
- a TPU kernel shifting whole int32 words (left, then arithmetically right) gets, for each (byte e,
  plane s), every 4th value of the planes: a fixed permutation of K that the activations take instead.
"""

import jax
import jax.numpy as jnp
import numpy as np

VALUES_PER_WORD = 16
VALUES_PER_BYTE = 4
BITS_PER_VALUE = 2
MAX_GROUP_BYTES = 128  # one 128-byte swizzle row of the GPU's shared-memory tiles
_PLANE_SHIFTS = np.arange(VALUES_PER_BYTE, dtype=np.uint32) * BITS_PER_VALUE
_BYTE_SHIFTS = np.arange(VALUES_PER_WORD // VALUES_PER_BYTE, dtype=np.uint32) * 8


def group_bytes(k: int) -> int:
  """Bytes per interleave group for a K of `k` values (a multiple of 16)."""
  if k <= 0 or k % VALUES_PER_WORD:
    raise ValueError(f"K={k} must be a positive multiple of {VALUES_PER_WORD} to pack ternary weights")
  return int(np.gcd(k // VALUES_PER_BYTE, MAX_GROUP_BYTES))


def pack_ternary(w: jax.Array) -> jax.Array:
  """(N, K) values in {-1, 0, 1} (integer or float dtype) -> (N, K // 16) uint32 words."""
  if w.ndim != 2:
    raise ValueError(f"pack_ternary takes a 2-D (N, K) matrix, got shape {w.shape}")
  if not (jnp.issubdtype(w.dtype, jnp.integer) or jnp.issubdtype(w.dtype, jnp.floating)):
    raise TypeError(f"pack_ternary takes integer or float values in {{-1, 0, 1}}, got {w.dtype}")
  n, k = w.shape
  b = group_bytes(k)
  codes = (w.astype(jnp.int32) & 3).astype(jnp.uint32)
  # [N, groups, 4 planes, B bytes] -> plane s to bits 2s of its byte, OR the planes together.
  codes = codes.reshape(n, k // (VALUES_PER_BYTE * b), VALUES_PER_BYTE, b)
  row_bytes = jnp.bitwise_or.reduce(codes << jnp.asarray(_PLANE_SHIFTS)[:, None], axis=2)
  # [N, K // 16 words, 4 bytes] -> byte e to bits 8e of its word (little-endian byte order).
  row_bytes = row_bytes.reshape(n, k // VALUES_PER_WORD, len(_BYTE_SHIFTS))
  return jnp.bitwise_or.reduce(row_bytes << jnp.asarray(_BYTE_SHIFTS), axis=2)


def unpack_ternary(words: jax.Array, dtype=jnp.int8) -> jax.Array:
  """(N, K // 16) uint32 words -> (N, K) values in {-1, 0, 1} of `dtype`."""
  if words.dtype != jnp.uint32:
    raise TypeError(f"packed ternary weights must be uint32, got {words.dtype}")
  if words.ndim != 2:
    raise ValueError(f"packed ternary weights must be 2-D (N, K // 16), got shape {words.shape}")
  n, num_words = words.shape
  k = num_words * VALUES_PER_WORD
  b = group_bytes(k)
  row_bytes = (words[:, :, None] >> jnp.asarray(_BYTE_SHIFTS)) & 0xFF  # [N, K // 16, 4]
  grouped = row_bytes.reshape(n, k // (VALUES_PER_BYTE * b), 1, b)
  codes = (grouped >> jnp.asarray(_PLANE_SHIFTS)[:, None]) & 3  # [N, groups, 4, B]
  values = (codes.astype(jnp.int32) ^ 2) - 2  # two's complement of 2 bits: 0b11 -> -1
  return values.astype(dtype).reshape(n, k)
