"""BSQ against the official BSQ-ViT `BinarySphericalQuantizer` (../shared/parity/bsq_quantizer)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity

from bitgen import quantizers
from bitgen.quantizers import bits as bits_lib
from bitgen.quantizers import bsq

CASES = [("group", 1.0, "group_tau1"), ("group", 3.0, "group_tau3"),
         ("analytical", 1.0, "analytical_tau1"), ("analytical", 3.0, "analytical_tau3")]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def fixture():
  return load_parity("bsq_quantizer", "fixture.npz")


def _config(mode, tau):
  return bsq.BSQConfig(num_bits=18, group_size=9, persample_entropy=mode, inv_temperature=tau,
                       beta=0.25, gamma0=1.0, gamma=1.0, zeta=1.0, l2_norm=True)


@pytest.mark.parametrize("mode,tau,case", CASES)
def test_matches_official_forward(fixture, mode, tau, case):
  config = _config(mode, tau)
  out = bsq.quantize(jnp.asarray(fixture["z"]), config)
  want = lambda name: fixture[f"{case}/{name}"]
  np.testing.assert_array_equal(np.asarray(out.quantized), want("zq"))
  np.testing.assert_array_equal(np.asarray(out.indices), want("indices"))
  np.testing.assert_array_equal(
      np.asarray(bsq.group_indices(out.codes, config.group_size)), want("group_indices"))
  m = out.metrics
  np.testing.assert_allclose(m["persample_entropy"], want("persample_entropy"), **TOL)
  np.testing.assert_allclose(m["codebook_entropy"], want("codebook_entropy"), **TOL)
  np.testing.assert_allclose(m["persample_entropy"] - m["codebook_entropy"],
                             want("entropy_penalty"), **TOL)
  np.testing.assert_allclose(config.beta * m["commitment"], want("commit_loss"), **TOL)
  np.testing.assert_allclose(m["avg_prob"], want("avg_prob"), **TOL)
  np.testing.assert_allclose(out.loss, want("loss"), **TOL)


def loss_and_ste_gradients(quantize, x, r):
  """(d loss/dx, d sum(quantized * r)/dx) from one jitted forward."""
  def forward(x):
    out = quantize(x)
    return out.loss, out.quantized

  def both(x):
    _, vjp = jax.vjp(forward, x)
    return vjp((jnp.ones(()), jnp.zeros_like(r)))[0], vjp((jnp.zeros(()), r))[0]
  return jax.jit(both)(x)


@pytest.mark.parametrize("mode,tau,case", CASES)
def test_matches_official_gradients(fixture, mode, tau, case):
  config = _config(mode, tau)
  z, r = jnp.asarray(fixture["z"]), jnp.asarray(fixture["r"])
  grad_loss, grad_ste = loss_and_ste_gradients(lambda z: bsq.quantize(z, config), z, r)
  np.testing.assert_allclose(grad_loss + grad_ste, fixture[f"{case}/grad_total"], **TOL)
  np.testing.assert_allclose(grad_ste, fixture[f"{case}/grad_ste_only"], **TOL)
  np.testing.assert_allclose(grad_loss, fixture[f"{case}/grad_loss_only"], **TOL)


@pytest.mark.parametrize("case", [c for _, _, c in CASES])
def test_decodes_official_indices(fixture, case):
  config = _config("group", 1.0)
  decoded = bsq.decode_indices(jnp.asarray(fixture[f"{case}/indices"]), config)
  np.testing.assert_array_equal(np.asarray(decoded), fixture[f"{case}/codebook_entry_from_indices"])
  bits = bsq.group_indices_to_bits(jnp.asarray(fixture[f"{case}/group_indices"]), 9)
  np.testing.assert_array_equal(np.asarray(bits_lib.bits_to_signs(bits)),
                                fixture[f"{case}/group_codes_from_group_indices"])


def test_group_codebook_is_official_buffer(fixture):
  np.testing.assert_array_equal(np.asarray(bsq.group_codebook(9)), fixture["group_codebook"])


def _random_unit(key, shape):
  z = jax.random.normal(key, shape)
  return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


@pytest.mark.parametrize("mode", ["group", "analytical"])
def test_invariants(mode):
  num_bits, group_size = 12, 4
  config = bsq.BSQConfig(num_bits=num_bits, group_size=group_size, persample_entropy=mode)
  out = bsq.quantize(_random_unit(jax.random.key(0), (3, 5, num_bits)), config)
  np.testing.assert_allclose(np.abs(out.quantized), 1 / math.sqrt(num_bits), rtol=1e-6)
  assert out.codes.dtype == jnp.uint8 and out.indices.dtype == jnp.int32
  np.testing.assert_array_equal(bsq.decode_codes(out.codes, config), out.quantized)
  ps, cb = out.metrics["persample_entropy"], out.metrics["codebook_entropy"]
  # Entropy of a mean >= mean of entropies (concavity); each term <= L log 2 nats.
  assert 0 <= ps <= cb + 1e-5 <= num_bits * math.log(2) + 1e-4
  assert out.metrics["bit_entropy"].shape == (num_bits,)
  assert np.all((out.metrics["bit_entropy"] >= 0) & (out.metrics["bit_entropy"] <= 1))
  distinct = len(np.unique(np.asarray(out.indices)))
  assert out.metrics["distinct_codes"] == distinct
  np.testing.assert_allclose(out.metrics["code_usage"], distinct / 15)  # min(15 tokens, 2**12)


def test_jit_matches_eager():
  config = bsq.BSQConfig(num_bits=18, group_size=9)
  u = _random_unit(jax.random.key(1), (2, 4, 18))
  eager = bsq.quantize(u, config)
  jitted = jax.jit(bsq.quantize, static_argnums=1)(u, config)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, **TOL)


def test_wide_codes_have_no_int32_indices():
  config = bsq.BSQConfig(num_bits=36, group_size=9)
  out = bsq.quantize(_random_unit(jax.random.key(2), (2, 3, 36)), config)
  assert out.indices is None
  assert out.metrics["distinct_codes"] == 6


def test_metrics_carry_no_gradient():
  config = bsq.BSQConfig(num_bits=18, group_size=9)
  u = _random_unit(jax.random.key(3), (2, 4, 18))
  grad = jax.grad(lambda u: bsq.quantize(u, config).metrics["codebook_entropy"])(u)
  np.testing.assert_array_equal(grad, 0)


def test_module_from_config():
  q = quantizers.build({"name": "bsq", "num_bits": 18, "group_size": 9, "inv_temperature": 2.0})
  assert isinstance(q, quantizers.BSQ) and q.dim == 18 and q.num_bits == 18
  u = _random_unit(jax.random.key(4), (2, 4, 18))
  out = q(u)
  np.testing.assert_array_equal(q.decode_codes(out.codes), out.quantized)
  np.testing.assert_array_equal(q.decode_indices(out.indices), out.quantized)
  no_loss = q(u, compute_loss=False)
  assert no_loss.loss == 0 and "commitment" not in no_loss.metrics


def test_bad_input():
  with pytest.raises(ValueError, match="not divisible by group_size"):
    bsq.BSQConfig(num_bits=18, group_size=4)
  with pytest.raises(ValueError, match="persample_entropy"):
    bsq.BSQConfig(num_bits=18, persample_entropy="exact")
  config = bsq.BSQConfig(num_bits=18)
  with pytest.raises(ValueError, match=r"shape \(\.\.\., 18\)"):
    bsq.quantize(jnp.zeros((2, 16)), config)
  with pytest.raises(TypeError, match="floating"):
    bsq.quantize(jnp.zeros((2, 18), jnp.int32), config)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
    quantizers.build({"name": "bsq", "num_bits": 18, "bogus": 1})
  with pytest.raises(ValueError, match="unknown quantizer name 'vq'"):
    quantizers.build({"name": "vq", "num_bits": 18})


def test_unscaled_codes_and_lsb_indices():
  """l2_norm=False: codes +-1 and analytical p = sigmoid(-4 tau u); bit_order='lsb' indices."""
  config = bsq.BSQConfig(num_bits=6, group_size=3, persample_entropy="analytical", l2_norm=False,
                         inv_temperature=2.0, bit_order="lsb")
  u = jax.random.normal(jax.random.key(5), (4, 6))
  out = bsq.quantize(u, config)
  np.testing.assert_array_equal(out.quantized, np.where(u > 0, 1.0, -1.0))
  np.testing.assert_array_equal(out.indices, np.sum(np.asarray(out.codes) << np.arange(6), axis=-1))
  np.testing.assert_array_equal(bsq.decode_indices(out.indices, config), out.quantized)
  p = jax.nn.sigmoid(-8.0 * u)
  binary = lambda q: -(q * np.log(q + 1e-8) + (1 - q) * np.log(1 - q + 1e-8))
  np.testing.assert_allclose(out.metrics["persample_entropy"], binary(p).sum(-1).mean(), atol=1e-5)
  np.testing.assert_allclose(out.metrics["codebook_entropy"], binary(p.mean(0)).sum(), atol=1e-5)
