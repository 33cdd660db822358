"""Packed ternary (b1.58) weights: 2 bits a value, 16 values a uint32 word, K-major (N, K) layout.

A ternary matrix `w` (N, K) with values in {-1, 0, +1} is stored as `(N, K // 16)` uint32 words, each
row K-contiguous ("K-major", the layout Hopper's int8 MMA and the TPU's transposed-RHS matmul read).
Each value is stored as the 2-bit code `w + 1` in {0, 1, 2}.

Inside a row the words come in groups of `G = group_words(K)` words (the largest power of two
<= 128 dividing K // 16) covering `16 G` consecutive values: bits `[2 j, 2 j + 2)` of word `i` of a
group hold the value at offset `j G + i` of that group. Unpacking bit pair `j` of a group's G words
thus yields the contiguous run `[j G, (j + 1) G)` ("plane" j): a kernel unpacks with one shift and
mask per plane and dots it with a contiguous slice of the activations, with no shuffles.
"""

import jax
import jax.numpy as jnp
import numpy as np

VALUES_PER_WORD = 16
BITS_PER_VALUE = 2
MAX_GROUP_WORDS = 128
_SHIFTS = np.arange(VALUES_PER_WORD, dtype=np.uint32) * BITS_PER_VALUE


def group_words(k: int) -> int:
  """Words per interleave group for a K of `k` values (a multiple of 16)."""
  if k <= 0 or k % VALUES_PER_WORD:
    raise ValueError(f"K={k} must be a positive multiple of {VALUES_PER_WORD} to pack ternary weights")
  return int(np.gcd(k // VALUES_PER_WORD, MAX_GROUP_WORDS))


def pack_ternary(w: jax.Array) -> jax.Array:
  """(N, K) values in {-1, 0, 1} (integer or float dtype) -> (N, K // 16) uint32 words."""
  if w.ndim != 2:
    raise ValueError(f"pack_ternary takes a 2-D (N, K) matrix, got shape {w.shape}")
  if not (jnp.issubdtype(w.dtype, jnp.integer) or jnp.issubdtype(w.dtype, jnp.floating)):
    raise TypeError(f"pack_ternary takes integer or float values in {{-1, 0, 1}}, got {w.dtype}")
  n, k = w.shape
  g = group_words(k)
  codes = (w.astype(jnp.int32) + 1).astype(jnp.uint32)
  # [N, groups, 16 planes, G words] -> shift plane j to bits 2j, OR the planes together.
  codes = codes.reshape(n, k // (VALUES_PER_WORD * g), VALUES_PER_WORD, g)
  words = jnp.bitwise_or.reduce(codes << jnp.asarray(_SHIFTS)[:, None], axis=2)  # [N, groups, G]
  return words.reshape(n, k // VALUES_PER_WORD)


def unpack_ternary(words: jax.Array, dtype=jnp.int8) -> jax.Array:
  """(N, K // 16) uint32 words -> (N, K) values in {-1, 0, 1} of `dtype`."""
  if words.dtype != jnp.uint32:
    raise TypeError(f"packed ternary weights must be uint32, got {words.dtype}")
  if words.ndim != 2:
    raise ValueError(f"packed ternary weights must be 2-D (N, K // 16), got shape {words.shape}")
  n, num_words = words.shape
  k = num_words * VALUES_PER_WORD
  g = group_words(k)
  grouped = words.reshape(n, num_words // g, 1, g)
  codes = (grouped >> jnp.asarray(_SHIFTS)[:, None]) & 3  # [N, groups, 16, G]
  return (codes.astype(jnp.int32) - 1).astype(dtype).reshape(n, k)
