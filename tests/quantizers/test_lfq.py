"""LFQ against Open-MAGVIT2 and lucidrains' official LFQ (../shared/parity/lfq_quantizer)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity

from bitgen import quantizers
from bitgen.quantizers import lfq
from bitgen.quantizers import ops

TOL = dict(atol=1e-5, rtol=1e-5)  # rtol matters only for the 1e12 gradients of the zero token


@pytest.fixture(scope="module")
def fixture():
  return load_parity("lfq_quantizer", "fixture.npz")


def _nhwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 1)


def _grads(config, x, r):
  """d(loss + sum(quantized * r))/dx and d(sum(quantized * r))/dx from one jitted forward."""
  def forward(x):
    out = lfq.quantize(x, config)
    return out.loss, out.quantized

  def both(x):
    _, vjp = jax.vjp(forward, x)
    grad_ste = vjp((jnp.zeros(()), r))[0]
    return vjp((jnp.ones(()), jnp.zeros_like(r)))[0] + grad_ste, grad_ste
  return jax.jit(both)(x)


OM2 = lfq.LFQConfig(num_bits=10, flavour="open_magvit2", entropy="exact")


@pytest.mark.parametrize("case,scale", [("om2_unit", 1.0), ("om2_small", 0.01)])
def test_open_magvit2(fixture, case, scale):
  x, r = _nhwc(fixture["x"]) * scale, _nhwc(fixture["r_img"])  # [B, H, W, C]
  want = lambda name: fixture[f"{case}/{name}"]
  out = lfq.quantize(x, OM2)
  np.testing.assert_array_equal(out.quantized.transpose(0, 3, 1, 2), want("quantized"))
  np.testing.assert_array_equal(out.indices.reshape(-1), want("indices"))
  m = out.metrics
  np.testing.assert_allclose(m["persample_entropy"], want("per_sample_entropy"), **TOL)
  np.testing.assert_allclose(m["codebook_entropy"], want("codebook_entropy"), **TOL)
  np.testing.assert_allclose(m["persample_entropy"] - m["codebook_entropy"],
                             want("entropy_aux_loss"), **TOL)
  np.testing.assert_allclose(m["commitment"], want("commitment"), **TOL)
  np.testing.assert_allclose(out.loss, want("weighted_quantizer_loss"), **TOL)
  grad_total, grad_ste = _grads(OM2, x, r)
  np.testing.assert_allclose(grad_total.transpose(0, 3, 1, 2), want("grad_total"), **TOL)
  np.testing.assert_allclose(grad_ste.transpose(0, 3, 1, 2), want("grad_ste_only"), **TOL)
  decoded = lfq.decode_indices(jnp.asarray(want("indices")).reshape(2, 16), OM2)
  np.testing.assert_array_equal(decoded, want("decode_from_indices"))


def test_open_magvit2_factorized_indices(fixture):
  out = lfq.quantize(_nhwc(fixture["x"]), OM2, compute_loss=False)
  np.testing.assert_array_equal(out.quantized.transpose(0, 3, 1, 2),
                                fixture["om2_factorized/quantized"])
  pre, post = lfq.factorized_indices(out.codes, (6, 4), "lsb")
  np.testing.assert_array_equal(pre.reshape(-1), fixture["om2_factorized/indices_pre"])
  np.testing.assert_array_equal(post.reshape(-1), fixture["om2_factorized/indices_post"])


@pytest.mark.parametrize("case,scale,spherical,tau", [
    ("luci_unit", 1.0, False, 100.0), ("luci_small", 0.01, False, 100.0),
    ("luci_spherical", 1.0, True, 10.0)])
def test_lucidrains(fixture, case, scale, spherical, tau):
  config = lfq.LFQConfig(num_bits=10, flavour="lucidrains", spherical=spherical,
                         inv_temperature=tau, entropy_loss_weight=0.1, commitment_loss_weight=0.25)
  x, r = jnp.asarray(fixture["x_tok"]) * scale, jnp.asarray(fixture["r_tok"])
  want = lambda name: fixture[f"{case}/{name}"]
  out = lfq.quantize(x, config)
  np.testing.assert_allclose(out.quantized, want("quantized"), atol=1e-7, rtol=0)
  np.testing.assert_allclose(out.quantized, want("quantized_eval"), atol=1e-7, rtol=0)
  np.testing.assert_array_equal(out.indices, want("indices"))
  m = out.metrics
  np.testing.assert_allclose(m["persample_entropy"], want("per_sample_entropy"), **TOL)
  np.testing.assert_allclose(m["codebook_entropy"], want("batch_entropy"), **TOL)
  np.testing.assert_allclose(m["commitment"], want("commitment"), **TOL)
  np.testing.assert_allclose(out.loss, want("aux_loss"), **TOL)
  grad_total, grad_ste = _grads(config, x, r)
  np.testing.assert_allclose(grad_total, want("grad_total"), **TOL)
  np.testing.assert_allclose(grad_ste, want("grad_ste_only"), **TOL)
  np.testing.assert_array_equal(lfq.decode_indices(jnp.asarray(want("indices")), config),
                                want("indices_to_codes"))
  np.testing.assert_array_equal(lfq.decode_codes(out.codes, config), want("quantized_eval"))


def _full_table_entropies(x, flavour, spherical, tau):
  """The official computation: a softmax over the whole [N, 2**L] table of codes."""
  num_bits = x.shape[-1]
  codebook = 2.0 * ((jnp.arange(2 ** num_bits)[:, None] >> jnp.arange(num_bits)) & 1) - 1
  if spherical:
    x, codebook = x / jnp.linalg.norm(x, axis=-1, keepdims=True), codebook / math.sqrt(num_bits)
  logits = 2 * x @ codebook.T * tau
  p = jax.nn.softmax(logits, axis=-1)
  avg = jnp.mean(p, axis=0)
  if flavour == "open_magvit2":
    return (jnp.mean(-jnp.sum(p * jax.nn.log_softmax(logits), axis=-1)),
            -jnp.sum(avg * jnp.log(avg + 1e-5)))
  clamped = lambda q: -jnp.sum(q * jnp.log(jnp.maximum(q, 1e-5)), axis=-1)
  return jnp.mean(clamped(p)), clamped(avg)


@pytest.mark.parametrize("flavour", ["open_magvit2", "lucidrains"])
@pytest.mark.parametrize("num_bits,spherical,scale", [(7, False, 0.01), (8, True, 1.0), (1, False, 0.005)])
def test_exact_entropy_equals_full_table(flavour, num_bits, spherical, scale):
  """The half-split exact entropies (values and gradients) equal the official full-table ones."""
  config = lfq.LFQConfig(num_bits=num_bits, flavour=flavour, spherical=spherical,
                         inv_temperature=30.0, entropy="exact")
  x = jax.random.normal(jax.random.key(0), (48, num_bits)) * scale

  def ours(x):
    return lfq.entropy_terms(ops.l2_normalize(x) if spherical else x, config)

  def reference(x):
    return _full_table_entropies(x, flavour, spherical, 30.0)

  np.testing.assert_allclose(ours(x), reference(x), atol=1e-5)
  # Both terms' gradients at once: [2 terms] of [N, L].
  grads_ours, grads_reference = (jax.jit(jax.jacrev(f))(x) for f in (ours, reference))
  np.testing.assert_allclose(grads_ours, grads_reference, atol=1e-5)


@pytest.mark.parametrize("flavour", ["open_magvit2", "lucidrains"])
def test_factorized_entropy(flavour):
  """Per-bit form: same per-sample entropy as the exact softmax, codebook entropy an upper bound."""
  x = jax.random.normal(jax.random.key(0), (64, 8)) * 0.01
  exact, factorized = (lfq.LFQConfig(num_bits=8, flavour=flavour, entropy=e)
                       for e in ("exact", "factorized"))
  ps_exact, cb_exact = lfq.entropy_terms(x, exact)
  ps_fact, cb_fact = lfq.entropy_terms(x, factorized)
  np.testing.assert_allclose(ps_fact, ps_exact, atol=1e-3)  # the clamp acts differently per bit
  assert cb_exact <= cb_fact + 1e-4 <= 8 * math.log(2) + 1e-3


def test_entropy_form_auto():
  assert lfq.LFQConfig(num_bits=18).exact_entropy
  assert not lfq.LFQConfig(num_bits=19).exact_entropy
  out = lfq.quantize(jax.random.normal(jax.random.key(1), (2, 3, 36)), lfq.LFQConfig(num_bits=36))
  assert out.indices is None and out.metrics["codebook_entropy"] <= 36 * math.log(2)


def test_jit_matches_eager_and_module():
  config = lfq.LFQConfig(num_bits=10, flavour="open_magvit2")
  x = jax.random.normal(jax.random.key(2), (2, 5, 10)) * 0.1
  eager = lfq.quantize(x, config)
  jitted = jax.jit(lfq.quantize, static_argnums=1)(x, config)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, **TOL)
  q = quantizers.build({"name": "lfq", "num_bits": 10, "flavour": "open_magvit2"})
  assert isinstance(q, quantizers.LFQ) and q.dim == 10 and q.num_bits == 10
  out = q(x)
  np.testing.assert_array_equal(out.indices, eager.indices)
  np.testing.assert_array_equal(q.decode_indices(out.indices), q.decode_codes(out.codes))
  np.testing.assert_array_equal(q.decode_codes(out.codes), out.quantized)


def test_bad_input():
  config = lfq.LFQConfig(num_bits=10)
  with pytest.raises(ValueError, match=r"shape \(\.\.\., 10\)"):
    lfq.quantize(jnp.zeros((2, 4, 9)), config)
  with pytest.raises(ValueError, match="flavour"):
    lfq.LFQConfig(num_bits=10, flavour="magvit")
  with pytest.raises(ValueError, match="does not sum"):
    lfq.factorized_indices(jnp.zeros((2, 10), jnp.uint8), (6, 5))
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['codebook_size'\]"):
    quantizers.build({"name": "lfq", "num_bits": 10, "codebook_size": 1024})
