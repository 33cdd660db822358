"""Multi-scale residual BSQ against the official Infinity `MultiScaleBSQ` (../shared/parity/infinity_vae)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity

from bitgen.quantizers import bits as bits_lib
from bitgen.quantizers import multiscale as ms

GRIDS = ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8))


def nhwc(x):  # (B, d, 1, h, w) or (B, d, h, w) -> (B, h, w, d)
  x = x[:, :, 0] if x.ndim == 5 else x
  return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def io():
  return load_parity("infinity_vae", "io.npz")


def test_bits_and_sum_match_official(io):
  out = jax.jit(ms.multiscale_quantize, static_argnums=1)(nhwc(io["encoder_features"]), GRIDS)
  for k, bits in enumerate(ms.split_scales(out.codes, GRIDS)):
    np.testing.assert_array_equal(np.asarray(bits), io[f"scale{k}_bit_labels"][:, 0])
  assert out.codes.dtype == jnp.uint8 and out.codes.shape == (2, sum(h * w for h, w in GRIDS), 16)
  np.testing.assert_allclose(out.quantized, nhwc(io["summed_quantized_latent"]), atol=1e-6)


def test_resizes_match_official_interpolate(io):
  residual = nhwc(io["encoder_features"])
  for k, grid in enumerate(GRIDS):
    np.testing.assert_allclose(ms.area_resize(residual, grid), nhwc(io[f"scale{k}_residual_in"]),
                               atol=1e-6)
    up = ms.bilinear_resize(nhwc(io[f"scale{k}_quantized"]), (8, 8))
    np.testing.assert_allclose(up, nhwc(io[f"scale{k}_quantized_upsampled"]), atol=1e-6)
    residual = residual - nhwc(io[f"scale{k}_quantized_upsampled"])
  for k in range(1, len(GRIDS)):  # MultiScaleBSQ's own next-scale inputs: area of the running sum
    total = sum(nhwc(io[f"scale{j}_quantized_upsampled"]) for j in range(k))
    np.testing.assert_allclose(ms.area_resize(total, GRIDS[k]), nhwc(io[f"scale{k}_var_input_area"]),
                               atol=1e-6)


def test_decode_path_from_bits(io):
  bits = [jnp.asarray(io[f"scale{k}_bit_labels"][:, 0]) for k in range(len(GRIDS))]
  codes = ms.codes_from_bits(bits, (8, 8))
  np.testing.assert_allclose(codes, nhwc(io["summed_codes_from_bit_labels"]), atol=1e-6)


def test_codes_are_signs_over_sqrt_d_with_msb_first_channel_zero():
  bits = jnp.array([[1, 0, 0, 1]], jnp.uint8)
  np.testing.assert_allclose(ms.bits_to_codes(bits), [[0.5, -0.5, -0.5, 0.5]], atol=1e-7)
  assert int(bits_lib.bits_to_indices(bits, "msb")[0]) == 0b1001
  _, q, b = ms.quantize_scale(jnp.array([[0.3, 0.0, -2.0, 1e-9]]))
  np.testing.assert_array_equal(b, [[1, 0, 0, 1]])  # sign(0) -> bit 0
  np.testing.assert_allclose(q, ms.bits_to_codes(b), atol=1e-7)


def test_straight_through_gradient_is_that_of_the_l2_normalisation():
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  w = jax.random.normal(jax.random.key(1), z.shape)
  grad_q = jax.jit(jax.grad(lambda z: jnp.sum(w * ms.multiscale_quantize(z, [(4, 4)]).quantized)))(z)
  grad_u = jax.grad(lambda z: jnp.sum(w * z / jnp.linalg.norm(z, axis=-1, keepdims=True)))(z)
  np.testing.assert_allclose(grad_q, grad_u, atol=1e-5)
  # Coarser scales pass their gradient through the area downsampling: every position gets some.
  grad_ms = jax.jit(jax.grad(
      lambda z: jnp.sum(w * ms.multiscale_quantize(z, [(1, 1), (2, 2), (4, 4)]).quantized)))(z)
  assert np.all(np.abs(np.asarray(grad_ms)).sum(-1) > 0)


def test_loss_terms():
  z = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))
  out = jax.jit(lambda z: ms.multiscale_quantize(z, [(4, 4)], entropy_weight=0.0))(z)
  u = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  commitment = jnp.mean(jnp.sum((jnp.where(u > 0, 1.0, -1.0) / jnp.sqrt(8.0) - u) ** 2, -1))
  np.testing.assert_allclose(out.metrics["commitment"], commitment, rtol=1e-5)
  np.testing.assert_allclose(out.loss, 0.25 * commitment, rtol=1e-5)
  loss_grad = jax.jit(jax.grad(lambda z: ms.multiscale_quantize(z, [(1, 1), (4, 4)]).loss))(z)
  assert np.isfinite(np.asarray(loss_grad)).all() and np.abs(np.asarray(loss_grad)).max() > 0


def test_bad_schedules_raise():
  z = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match="ends at"):
    ms.multiscale_quantize(z, [(1, 1), (4, 4)])
  with pytest.raises(ValueError, match="non-empty"):
    ms.multiscale_quantize(z, [])
  with pytest.raises(ValueError, match="do not match"):
    ms.split_scales(jnp.zeros((1, 6, 4)), [(1, 1), (2, 2)])
