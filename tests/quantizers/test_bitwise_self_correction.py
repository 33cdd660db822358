"""Bitwise self-correction against the official `flip_requant` with its recorded random draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity

from bitgen.quantizers import bitwise_self_correction as bsc
from bitgen.quantizers import multiscale


def nhwc(x):  # (B, d, 1, h, w) -> (B, h, w, d)
  return jnp.asarray(x[:, :, 0].transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def fixture():
  return load_parity("bitwise_self_correction", "fixture.npz")


def grids_of(fixture):
  return tuple((int(h), int(w)) for _, h, w in fixture["scale_schedule"])


def test_recorded_draws_reproduce_official(fixture):
  grids = grids_of(fixture)
  noise = bsc.FlipNoise(
      strengths=jnp.asarray(fixture["flip_strengths"], jnp.float32),
      uniforms=tuple(jnp.asarray(fixture[f"scale{k}_uniform"][:, 0]) for k in range(len(grids))))
  run = jax.jit(bsc.flip_requant, static_argnums=1)
  inputs, labels = run(nhwc(fixture["raw_features"]), grids, noise)
  np.testing.assert_array_equal(np.asarray(labels), fixture["gt_bit_labels_BLd"])
  np.testing.assert_allclose(inputs, fixture["x_BLC_wo_prefix"], atol=1e-6)
  for k, bits in enumerate(multiscale.split_scales(labels, grids)):
    np.testing.assert_array_equal(np.asarray(bits), fixture[f"scale{k}_gt_bits"][:, 0])
  flipped = [int(fixture[f"scale{k}_flip_mask"].sum()) for k in range(len(grids))]
  assert flipped == [3, 28, 85, 351, 116, 100, 855]  # README: the flips really happen


def test_flip_mask_and_requantized_codes(fixture):
  k = 3
  bits = jnp.asarray(fixture[f"scale{k}_gt_bits"][:, 0])
  flip = jnp.asarray(fixture[f"scale{k}_uniform"][:, 0]) < jnp.float32(fixture["flip_strengths"][k])
  np.testing.assert_array_equal(np.asarray(flip), fixture[f"scale{k}_flip_mask"][:, 0].astype(bool))
  pred = jnp.where(flip, 1 - bits, bits)
  np.testing.assert_array_equal(np.asarray(pred), fixture[f"scale{k}_pred_bits"][:, 0])
  np.testing.assert_allclose(multiscale.bits_to_codes(pred), nhwc(fixture[f"scale{k}_requantized_codes"]),
                             atol=1e-7)


def test_clean_teacher_forcing_matches_transformer_fixture():
  io = load_parity("infinity_transformer", "io.npz")
  grids = tuple((int(h), int(w)) for _, h, w in io["scale_schedule"])
  inputs, labels = jax.jit(bsc.flip_requant, static_argnums=1)(nhwc(io["raw_features"]), grids)
  np.testing.assert_array_equal(np.asarray(labels), io["gt_bit_labels_BLd"])
  np.testing.assert_allclose(inputs, io["x_BLC_wo_prefix"], atol=1e-6)


def test_drawn_noise_statistics_and_determinism():
  grids = ((1, 1), (2, 2), (4, 4), (8, 8))
  noise = bsc.draw_flip_noise(jax.random.key(0), grids, 3, 16, num_noisy_scales=3)
  again = bsc.draw_flip_noise(jax.random.key(0), grids, 3, 16, num_noisy_scales=3)
  np.testing.assert_array_equal(noise.strengths, again.strengths)
  assert float(noise.strengths[3]) == 0.0
  many = jax.jit(jax.vmap(lambda key: bsc.draw_flip_noise(key, grids, 1, 1).strengths))(
      jax.random.split(jax.random.key(1), 500))
  levels = np.round(np.asarray(many) * 100).astype(int)
  assert levels.min() == 0 and levels.max() == 30 and len(np.unique(levels)) == 31
  assert [u.shape for u in noise.uniforms] == [(3, h, w, 16) for h, w in grids]


def test_flips_change_later_labels_but_not_their_own():
  grids = ((1, 1), (2, 2), (4, 4))
  features = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))
  clean_inputs, clean_labels = bsc.flip_requant(features, grids)
  all_flip = bsc.FlipNoise(strengths=jnp.array([1.0, 0.0, 0.0]),
                           uniforms=tuple(jnp.zeros((2, h, w, 8)) for h, w in grids))
  inputs, labels = bsc.flip_requant(features, grids, all_flip)
  np.testing.assert_array_equal(labels[:, :1], clean_labels[:, :1])  # scale 0 keeps its clean label
  assert not np.array_equal(np.asarray(inputs), np.asarray(clean_inputs))
  assert not np.array_equal(np.asarray(labels[:, 1:]), np.asarray(clean_labels[:, 1:]))
  no_requant_inputs, _ = bsc.flip_requant(features, grids, all_flip, requantize=False)
  np.testing.assert_allclose(no_requant_inputs, clean_inputs, atol=1e-6)


def test_bad_noise_raises():
  grids = ((1, 1), (2, 2))
  features = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="does not fit 2 scales"):
    bsc.flip_requant(features, grids, bsc.draw_flip_noise(jax.random.key(0), grids[:1], 1, 4))
  with pytest.raises(ValueError, match="do not fit scale"):
    bsc.flip_requant(features, grids, bsc.draw_flip_noise(jax.random.key(0), grids, 2, 4))
  with pytest.raises(ValueError, match="max_strength"):
    bsc.draw_flip_noise(jax.random.key(0), grids, 1, 4, max_strength=1.5)
