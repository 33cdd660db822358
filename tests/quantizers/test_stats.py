"""Usage statistics of hard codes against direct numpy counts."""

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.quantizers import stats


def _entropy_bits(counts):
  p = counts[counts > 0] / counts.sum()
  return -(p * np.log2(p)).sum()


def test_bit_and_level_entropy():
  bits = jax.random.bernoulli(jax.random.key(0), jnp.array([0.5, 0.1, 0.0, 1.0]), (40, 4))
  bits = bits.astype(jnp.uint8)
  want = [_entropy_bits(np.bincount(np.asarray(bits)[:, i], minlength=2)) for i in range(4)]
  np.testing.assert_allclose(stats.bit_entropy(bits), want, atol=1e-6)
  np.testing.assert_array_equal(stats.bit_entropy(bits)[2:], 0)  # constant bits carry nothing
  digits = jax.random.randint(jax.random.key(1), (5, 8, 2), 0, 3)
  flat = np.asarray(digits).reshape(-1, 2)
  want = [_entropy_bits(np.bincount(flat[:, d], minlength=3)) for d in range(2)]
  np.testing.assert_allclose(stats.level_entropy(digits, (3, 3)), want, atol=1e-6)


def test_distinct_codes_and_usage():
  keys = jax.random.randint(jax.random.key(2), (6, 7, 2), 0, 3).astype(jnp.uint32)
  distinct = len(np.unique(np.asarray(keys).reshape(-1, 2), axis=0))
  assert stats.count_distinct_rows(keys) == distinct
  assert jax.jit(stats.count_distinct_rows)(keys) == distinct
  usage = stats.code_usage(keys, codebook_size=9.0)
  np.testing.assert_allclose(usage["code_usage"], distinct / 9)  # 42 codes can reach all 9
  assert stats.code_usage(keys[:1, :2], codebook_size=9.0)["code_usage"] <= 1
  assert stats.count_distinct_rows(jnp.zeros((0, 3), jnp.uint32)) == 0
