"""The one bits convention of bitgen.

Bits are integer arrays in {0, 1} (`uint8` when produced here) with the bit axis last: `(..., L)`.
A bit is 1 where the latent is positive: sign(0) -> bit 0 -> value -1, as in BSQ-ViT and LFQ.
Bit b stands for the value `2b - 1` in {-1, +1}.

Order: "msb" (default; BSQ-ViT, Infinity, lucidrains LFQ) makes bit 0 of the axis the most
significant bit of the integer index; "lsb" (Open-MAGVIT2, BitDance) makes it the least significant.

Packing: `uint32` words `(..., ceil(L / 32))`; word w holds bits [32w, 32w + n_w) in the same order,
right-aligned, so for L <= 32 the single word equals the integer index.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

BitOrder = Literal["msb", "lsb"]
WORD_BITS = 32
MAX_INDEX_BITS = 31  # indices are int32; wider codes travel as packed words.


def _check_order(order: str) -> None:
  if order not in ("msb", "lsb"):
    raise ValueError(f"bit order must be 'msb' or 'lsb', got {order!r}")


def _shifts(num_bits: int, order: BitOrder) -> np.ndarray:
  """Shift of each bit position inside its word, for positions padded to whole words."""
  _check_order(order)
  num_words = -(-num_bits // WORD_BITS)
  shifts = np.zeros(num_words * WORD_BITS, np.uint32)
  for i in range(num_bits):
    word, j = divmod(i, WORD_BITS)
    bits_in_word = min(WORD_BITS, num_bits - word * WORD_BITS)
    shifts[i] = bits_in_word - 1 - j if order == "msb" else j
  return shifts


def signs_to_bits(x: jax.Array) -> jax.Array:
  """(..., L) real -> (..., L) uint8, 1 where x > 0."""
  return (x > 0).astype(jnp.uint8)


def bits_to_signs(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
  """(..., L) {0,1} -> (..., L) {-1,+1}."""
  return 2 * bits.astype(dtype) - 1


def bits_to_indices(bits: jax.Array, order: BitOrder = "msb") -> jax.Array:
  """(..., L) {0,1} -> (...,) int32 code index, L <= 31."""
  num_bits = bits.shape[-1]
  if not 1 <= num_bits <= MAX_INDEX_BITS:
    raise ValueError(
        f"bits_to_indices takes 1..{MAX_INDEX_BITS} bits (int32 indices), got {num_bits}; "
        "use pack_bits for wider codes")
  weights = jnp.asarray(1 << _shifts(num_bits, order)[:num_bits].astype(np.int64), jnp.int32)
  return jnp.sum(bits.astype(jnp.int32) * weights, axis=-1, dtype=jnp.int32)


def indices_to_bits(indices: jax.Array, num_bits: int, order: BitOrder = "msb") -> jax.Array:
  """(...,) integer index -> (..., num_bits) uint8."""
  if not 1 <= num_bits <= MAX_INDEX_BITS:
    raise ValueError(f"indices_to_bits takes 1..{MAX_INDEX_BITS} bits, got {num_bits}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"indices must be integers, got {indices.dtype}")
  shifts = jnp.asarray(_shifts(num_bits, order)[:num_bits], jnp.int32)
  return ((indices.astype(jnp.int32)[..., None] >> shifts) & 1).astype(jnp.uint8)


def pack_bits(bits: jax.Array, order: BitOrder = "msb") -> jax.Array:
  """(..., L) {0,1} -> (..., ceil(L/32)) uint32 words."""
  num_bits = bits.shape[-1]
  shifts = _shifts(num_bits, order)
  pad = shifts.size - num_bits
  padded = jnp.pad(bits.astype(jnp.uint32), [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
  shifted = padded << jnp.asarray(shifts)
  words = shifted.reshape(*bits.shape[:-1], -1, WORD_BITS)
  return jnp.bitwise_or.reduce(words, axis=-1)


def unpack_bits(words: jax.Array, num_bits: int, order: BitOrder = "msb") -> jax.Array:
  """(..., ceil(num_bits/32)) uint32 -> (..., num_bits) uint8."""
  if words.dtype != jnp.uint32:
    raise TypeError(f"packed words must be uint32, got {words.dtype}")
  num_words = -(-num_bits // WORD_BITS)
  if words.shape[-1] != num_words:
    raise ValueError(f"{num_bits} bits need {num_words} words, got {words.shape[-1]}")
  shifts = jnp.asarray(_shifts(num_bits, order))
  expanded = jnp.repeat(words, WORD_BITS, axis=-1)
  return ((expanded >> shifts) & 1)[..., :num_bits].astype(jnp.uint8)
