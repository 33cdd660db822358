"""Bernoulli quantizer: thresholding, sampling, straight-through gradient, codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.quantizers.bernoulli import bernoulli_quantize
from bitgen.quantizers.bits import bits_to_indices


def test_eval_thresholds_at_one_half():
  probs = jnp.array([[0.2, 0.5, 0.50001, 0.9]])
  out = bernoulli_quantize(probs)
  np.testing.assert_array_equal(out.codes, [[0, 0, 1, 1]])
  assert out.codes.dtype == jnp.uint8
  np.testing.assert_array_equal(out.indices, bits_to_indices(out.codes))


def test_training_samples_bernoulli_with_the_given_probabilities():
  probs = jnp.broadcast_to(jnp.array([0.1, 0.5, 0.8]), (20000, 3))
  out = bernoulli_quantize(probs, key=jax.random.key(0))
  np.testing.assert_allclose(out.codes.mean(0), [0.1, 0.5, 0.8], atol=0.02)
  np.testing.assert_allclose(out.metrics["bit_entropy"][1], 1.0, atol=1e-3)


def test_straight_through_gradient_is_identity_on_probs():
  probs = jnp.array([[0.3, 0.7, 0.55]])
  weights = jnp.array([[2.0, -1.0, 0.5]])
  grad = jax.grad(lambda p: jnp.sum(bernoulli_quantize(p, key=jax.random.key(1)).quantized * weights))(probs)
  np.testing.assert_allclose(grad, weights)


def test_codebook_loss_and_weight():
  probs = jnp.full((2, 4), 0.25)
  out = bernoulli_quantize(probs, code_weight=2.0)
  s = 1 / (1 + np.exp(-0.25))  # the official loss applies sigmoid to the probabilities
  np.testing.assert_allclose(out.metrics["codebook_loss"], s * (1 - s), rtol=1e-6)
  np.testing.assert_allclose(out.loss, 2 * s * (1 - s), rtol=1e-6)


def test_wide_codes_have_no_int32_index_and_ints_are_rejected():
  assert bernoulli_quantize(jnp.full((1, 64), 0.7)).indices is None
  with pytest.raises(TypeError, match="float probabilities"):
    bernoulli_quantize(jnp.ones((1, 4), jnp.int32))
