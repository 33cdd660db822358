"""BLD evaluation: the NLL bound against closed-form answers, the bit-frequency baseline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitgen.eval import bld as bld_eval
from bitgen.models import bld_denoiser
from bitgen.sample import binary_diffusion as bd

POSITIONS, CHANNELS = 4, 4


@dataclasses.dataclass(frozen=True)
class OracleConfig:
  num_positions: int = POSITIONS
  num_bits: int = CHANNELS
  num_classes: int = 0


class OracleDenoiser(nnx.Module):
  """Data: every bit independent, P(bit = 1) = pi (one pi per bit). Predicts the exact flip logit
  of P(x_0 | x_t) = pi q(x_t | x_0) / sum_x0 (...)."""

  def __init__(self, pi: np.ndarray, schedule: bd.NoiseSchedule):
    self.config = OracleConfig()
    self.log_odds = nnx.Variable(jnp.asarray(np.log(pi / (1 - pi)), jnp.float32))
    self.k = nnx.Variable(jnp.asarray(schedule.k_final))
    self.b = nnx.Variable(jnp.asarray(schedule.b_final))

  def __call__(self, x_t, t, labels=None, *, drop_labels=None):
    del labels, drop_labels
    k, b = self.k[...][t][:, None, None], self.b[...][t][:, None, None]
    x = x_t.astype(jnp.float32)
    like = lambda x0: jnp.log(x * (k * x0 + b) + (1 - x) * (1 - k * x0 - b))  # log q(x_t | x_0)
    x0_logit = self.log_odds[...] + like(1.0) - like(0.0)
    return jnp.where(x_t == 1, -x0_logit, x0_logit)  # flip = (x_0 != x_t)


def expected_sampler_bound(pi: float, schedule: bd.NoiseSchedule) -> float:
  """E[bound] (bits) for one bit with P(1) = pi under the official sampling posterior, the
  oracle p0, by enumerating x_0, x_{t-1}, x_t in float64 (independently of bitgen.eval)."""
  k, b, beta = (np.asarray(a, np.float64) for a in (schedule.k_final, schedule.b_final, schedule.beta))
  T = schedule.total_steps
  q_t = lambda xt, x0, t: k[t] * x0 + b[t] if xt else 1 - k[t] * x0 - b[t]
  step = lambda xt, xp, t: beta[t] * xp + (1 - beta[t]) / 2 if xt else 1 - beta[t] * xp - (1 - beta[t]) / 2

  def p0(xt, t):
    one, zero = pi * q_t(xt, 1, t), (1 - pi) * q_t(xt, 0, t)
    return one / (one + zero)

  def normalise(one, zero):
    return one / (one + zero)

  def kl(q, p):
    return q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))

  total = 0.0
  for x0, weight in ((1, pi), (0, 1 - pi)):
    for t in range(2, T + 1):
      for xt in (0, 1):
        true = normalise(q_t(1, x0, t - 1) * step(xt, 1, t), q_t(0, x0, t - 1) * step(xt, 0, t))
        p = p0(xt, t)
        model = normalise((k[t - 1] * p + b[t - 1]) * step(xt, 1, t),
                          (k[t - 1] * (1 - p) + b[t - 1]) * step(xt, 0, t))
        total += weight * q_t(xt, x0, t) * kl(true, model)
    for x1 in (0, 1):
      total -= weight * q_t(x1, x0, 1) * np.log(p0(x1, 1) if x0 else 1 - p0(x1, 1))
  return total / np.log(2)


def entropy_bits(p):
  p = np.asarray(p, np.float64)
  return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


@pytest.mark.parametrize("beta_type", ["linear", "cos"])
def test_nll_bound_of_an_oracle_denoiser(beta_type):
  schedule = bd.noise_schedule(8, beta_type)
  pi = np.linspace(0.1, 0.9, POSITIONS * CHANNELS).reshape(POSITIONS, CHANNELS)
  x0 = (np.random.default_rng(0).uniform(size=(2048, POSITIONS, CHANNELS)) < pi).astype(np.uint8)
  bound = bld_eval.nll_bound(OracleDenoiser(pi, schedule), x0, jax.random.key(1), schedule=schedule)
  # The marginal reverse kernel with the true P(x_0 | x_t) is the true reverse process: the bound
  # is tight, E[bound] = the data entropy.
  np.testing.assert_allclose(bound["marginal"].mean(), entropy_bits(pi).mean(), atol=0.02)
  # The official sampling posterior counts x_t twice: a strictly looser bound, as enumerated.
  sampler = np.mean([expected_sampler_bound(p, schedule) for p in pi.ravel()])
  np.testing.assert_allclose(bound["sampler"].mean(), sampler, atol=0.02)
  assert sampler > entropy_bits(pi).mean() + 0.1


def test_nll_bound_checks_its_inputs():
  schedule = bd.noise_schedule(4)
  oracle = OracleDenoiser(np.full((POSITIONS, CHANNELS), 0.5), schedule)
  with pytest.raises(ValueError, match=r"x0 must be \(B, 4, 4\) bits"):
    bld_eval.nll_bound(oracle, np.zeros((2, 4, 3), np.uint8), jax.random.key(0), schedule=schedule)
  with pytest.raises(TypeError, match="integer or bool bits"):
    bld_eval.nll_bound(oracle, np.zeros((2, 4, 4), np.float32), jax.random.key(0), schedule=schedule)
  with pytest.raises(ValueError, match="denoiser is unconditional"):
    bld_eval.nll_bound(oracle, np.zeros((2, 4, 4), np.uint8), jax.random.key(0), schedule=schedule,
                       labels=np.zeros(2, np.int32))
  conditional = bld_denoiser.Denoiser(bld_denoiser.Config(
      num_bits=4, latent_size=2, width=8, heads=1, depth=1, num_classes=3, time_scale_steps=4),
      rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pass labels, or unconditional=True"):
    bld_eval.nll_bound(conditional, np.zeros((2, 4, 4), np.uint8), jax.random.key(0), schedule=schedule)
  for kwargs in (dict(labels=np.array([0, 2])), dict(unconditional=True)):
    out = bld_eval.nll_bound(conditional, np.ones((2, 4, 4), np.uint8), jax.random.key(0),
                             schedule=schedule, **kwargs)
    assert all(np.isfinite(v).all() and v.shape == (2,) and (v > 0).all() for v in out.values())


def test_bit_frequency_baseline():
  bits = np.zeros((4, 2, 1), np.uint8)
  bits[:2, 0] = 1   # bit 0: frequency 1/2
  bits[:1, 1] = 1   # bit 1: frequency 1/4
  freqs = bld_eval.bit_frequencies(bits)
  np.testing.assert_allclose(freqs, [[0.5], [0.25]])
  np.testing.assert_allclose(bld_eval.frequency_entropy_bits(freqs), (1 + entropy_bits(0.25)) / 2)
  assert bld_eval.frequency_entropy_bits([0.0, 1.0]) == 0.0
  # Cross-entropy of the training bits themselves with Laplace smoothing over count = 4 samples.
  smoothed = np.array([[3 / 6], [2 / 6]])
  expected = -np.mean(bits * np.log2(smoothed) + (1 - bits) * np.log2(1 - smoothed))
  np.testing.assert_allclose(bld_eval.frequency_cross_entropy_bits(freqs, bits, count=4), expected)
  with pytest.raises(ValueError, match="N > 0"):
    bld_eval.bit_frequencies(np.zeros((0, 3), np.uint8))
