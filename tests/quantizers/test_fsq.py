"""FSQ against lucidrains' official FSQ (../shared/parity/lfq_quantizer, case `fsq`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity

from bitgen import quantizers
from bitgen.quantizers import fsq

CONFIG = fsq.FSQConfig(levels=(8, 5, 5, 5))


@pytest.fixture(scope="module")
def fixture():
  return load_parity("lfq_quantizer", "fixture.npz")


def test_matches_official(fixture):
  z, r = jnp.asarray(fixture["fsq_z"]), jnp.asarray(fixture["fsq_r"])
  out = fsq.quantize(z, CONFIG)
  np.testing.assert_array_equal(out.quantized, fixture["fsq/codes"])
  np.testing.assert_array_equal(out.indices, fixture["fsq/indices"])
  np.testing.assert_array_equal(fsq.decode_codes(out.codes, CONFIG), fixture["fsq/codes"])
  np.testing.assert_array_equal(fsq.decode_indices(jnp.asarray(fixture["fsq/indices"]), CONFIG),
                                fixture["fsq/indices_to_codes"])
  np.testing.assert_array_equal(CONFIG.basis, fixture["fsq/basis"])
  np.testing.assert_array_equal(CONFIG.levels, fixture["fsq/levels"])
  grad = jax.grad(lambda z: jnp.sum(fsq.quantize(z, CONFIG).quantized * r))(z)
  np.testing.assert_allclose(grad, fixture["fsq/grad"], atol=1e-5, rtol=1e-5)
  assert out.loss == 0


def test_codes_cover_the_asymmetric_levels():
  z = jnp.linspace(-6.0, 6.0, 2001)[:, None] * jnp.ones((1, 4))
  out = fsq.quantize(z, CONFIG)
  for d, levels in enumerate(CONFIG.levels):
    np.testing.assert_array_equal(np.unique(out.codes[:, d]), np.arange(levels))
  np.testing.assert_allclose(out.quantized.min(axis=0), -1.0)
  np.testing.assert_allclose(out.quantized.max(axis=0), [0.75, 1.0, 1.0, 1.0])
  assert np.all(out.metrics["level_entropy"] <= np.log2(CONFIG.levels) + 1e-6)
  # Along the diagonal: 7 boundaries of channel 0 and 4 shared by the 5-level channels.
  assert out.metrics["distinct_codes"] == len(np.unique(np.asarray(out.codes), axis=0)) == 12


def test_levels_for_bits_and_jit():
  for num_bits in (2, 3, 8, 17, 18):
    config = fsq.FSQConfig(num_bits=num_bits)
    assert config.codebook_size == 2 ** num_bits and config.num_bits == num_bits
  q = quantizers.build({"name": "fsq", "num_bits": 8})
  assert isinstance(q, quantizers.FSQ) and q.dim == 4 and q.num_bits == 8
  z = jax.random.normal(jax.random.key(0), (2, 6, 4))
  eager, jitted = q(z), jax.jit(lambda z: fsq.quantize(z, q.config))(z)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(q.decode_indices(eager.indices), eager.quantized)


def test_wide_codebook_has_no_indices():
  config = fsq.FSQConfig(num_bits=36)
  out = fsq.quantize(jax.random.normal(jax.random.key(1), (3, 36 // 2)), config)
  assert out.indices is None and out.metrics["distinct_codes"] == 3
  assert math.isclose(config.num_bits, 36)


def test_bad_input():
  with pytest.raises(ValueError, match="levels must be integers >= 3"):
    fsq.FSQConfig(levels=(8, 2))
  with pytest.raises(ValueError, match="needs `levels` or `num_bits`"):
    fsq.FSQConfig()
  with pytest.raises(ValueError, match="not num_bits=10"):
    fsq.FSQConfig(levels=(8, 5), num_bits=10)
  with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
    fsq.quantize(jnp.zeros((2, 3)), CONFIG)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['bits'\]"):
    quantizers.build({"name": "fsq", "bits": 8})
