"""The bits convention: bits <-> int32 indices <-> packed uint32 words, both orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.quantizers import bits as bits_lib

WIDTHS = [1, 18, 31, 32, 33, 36, 64]


def _random_bits(num_bits, seed=0, shape=(3, 5)):
  return jax.random.bernoulli(jax.random.key(seed), 0.5, (*shape, num_bits)).astype(jnp.uint8)


def _python_index(row, order):
  """The integer a row of bits stands for, with Python's unbounded ints."""
  digits = row if order == "msb" else row[::-1]
  return int("".join(str(int(b)) for b in digits), 2)


def _words_to_python_index(words, num_bits, order):
  """Reassembles packed words (word w = bits [32w, 32w + n_w), right-aligned) into one integer."""
  value, position = 0, 0
  for w, word in enumerate(words):
    width = min(32, num_bits - 32 * w)
    if order == "msb":
      value = (value << width) | int(word)
    else:
      value |= int(word) << position
    position += width
  return value


@pytest.mark.parametrize("order", ["msb", "lsb"])
@pytest.mark.parametrize("num_bits", WIDTHS)
def test_pack_round_trip(num_bits, order):
  bits = _random_bits(num_bits)
  words = bits_lib.pack_bits(bits, order)
  assert words.dtype == jnp.uint32 and words.shape == (3, 5, -(-num_bits // 32))
  np.testing.assert_array_equal(bits_lib.unpack_bits(words, num_bits, order), bits)
  flat_bits, flat_words = np.asarray(bits).reshape(-1, num_bits), np.asarray(words).reshape(15, -1)
  for row, row_words in zip(flat_bits, flat_words):
    assert _words_to_python_index(row_words, num_bits, order) == _python_index(row, order)


@pytest.mark.parametrize("order", ["msb", "lsb"])
@pytest.mark.parametrize("num_bits", [w for w in WIDTHS if w <= 31])
def test_index_round_trip(num_bits, order):
  bits = _random_bits(num_bits, seed=1)
  indices = bits_lib.bits_to_indices(bits, order)
  assert indices.dtype == jnp.int32 and indices.shape == (3, 5)
  np.testing.assert_array_equal(bits_lib.indices_to_bits(indices, num_bits, order), bits)
  want = [_python_index(row, order) for row in np.asarray(bits).reshape(-1, num_bits)]
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1), want)
  # One word of up to 31 bits is the index itself.
  np.testing.assert_array_equal(bits_lib.pack_bits(bits, order)[..., 0], indices.astype(jnp.uint32))


def test_order_and_extremes():
  one_hot_first = jnp.zeros((18,), jnp.uint8).at[0].set(1)
  assert bits_lib.bits_to_indices(one_hot_first, "msb") == 2 ** 17
  assert bits_lib.bits_to_indices(one_hot_first, "lsb") == 1
  all_ones = jnp.ones((31,), jnp.uint8)
  assert bits_lib.bits_to_indices(all_ones) == 2 ** 31 - 1
  np.testing.assert_array_equal(bits_lib.pack_bits(jnp.ones((64,), jnp.uint8)), [2 ** 32 - 1] * 2)


def test_signs_and_sign_of_zero():
  x = jnp.array([-1.5, -0.0, 0.0, 1e-30, 2.0])
  bits = bits_lib.signs_to_bits(x)
  np.testing.assert_array_equal(bits, [0, 0, 0, 1, 1])
  assert bits.dtype == jnp.uint8
  np.testing.assert_array_equal(bits_lib.bits_to_signs(bits), [-1, -1, -1, 1, 1])


def test_jit_matches_eager():
  bits = _random_bits(36, seed=2)
  pack = jax.jit(bits_lib.pack_bits, static_argnums=1)
  np.testing.assert_array_equal(pack(bits, "lsb"), bits_lib.pack_bits(bits, "lsb"))


def test_bad_input():
  with pytest.raises(ValueError, match="1..31 bits"):
    bits_lib.bits_to_indices(_random_bits(32))
  with pytest.raises(ValueError, match="1..31 bits"):
    bits_lib.indices_to_bits(jnp.zeros((2,), jnp.int32), 33)
  with pytest.raises(TypeError, match="indices must be integers"):
    bits_lib.indices_to_bits(jnp.zeros((2,), jnp.float32), 8)
  with pytest.raises(ValueError, match="bit order must be 'msb' or 'lsb'"):
    bits_lib.pack_bits(_random_bits(8), "little")
  with pytest.raises(TypeError, match="uint32"):
    bits_lib.unpack_bits(jnp.zeros((2, 1), jnp.int32), 8)
  with pytest.raises(ValueError, match="36 bits need 2 words"):
    bits_lib.unpack_bits(jnp.zeros((2, 1), jnp.uint32), 36)
