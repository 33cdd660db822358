"""Bernoulli diffusion: official schedules, loss, posterior and full sampling; step rules; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity
from flax import nnx

from bitgen import configlib
from bitgen.convert import bld as convert
from bitgen.models import bld_denoiser as den_lib
from bitgen.sample import binary_diffusion as bd
from configs import bld as bld_configs


@pytest.fixture(scope="module")
def io():
  return load_parity("bld", "io.npz")


@pytest.fixture(scope="module")
def denoiser():
  weights = load_parity("bld", "weights_sampler.npz")
  config = configlib.from_dict(den_lib.Config, bld_configs.get_config("tiny").denoiser)
  model = nnx.eval_shape(lambda: den_lib.Denoiser(config, rngs=nnx.Rngs(0)))
  return convert.load_denoiser(model, weights, schedule=bd.noise_schedule(16))


@pytest.mark.parametrize("kind", ["linear", "cos", "sigmoid"])
@pytest.mark.parametrize("total", [16, 64])
def test_schedules_match_official(io, kind, total):
  schedule = bd.noise_schedule(total, kind)
  for name in ("k_final", "b_final", "beta", "cumbeta"):
    np.testing.assert_allclose(getattr(schedule, name), io[f"sched_{kind}_T{total}_{name}"], atol=1e-6,
                               err_msg=name)
  assert schedule.k_final[-1] == pytest.approx(0.0, abs=1e-6)  # x_T is fair coin flips


def test_training_loss_matches_official(io, denoiser):
  schedule = bd.noise_schedule(16)
  x0, t, labels = (jnp.asarray(io[k]) for k in ("loss_x0", "loss_t", "loss_label"))
  q = bd.q_probs(schedule, x0, t)
  np.testing.assert_allclose(q, io["loss_q_xt_given_x0"], atol=1e-7)
  x_t = (jnp.asarray(io["loss_uniform"]) < q).astype(jnp.uint8)
  np.testing.assert_array_equal(x_t, io["loss_x_t_in"])
  logits = denoiser(x_t, t, labels)
  np.testing.assert_allclose(logits, io["loss_denoiser_logits"], atol=1e-4)
  loss, metrics = bd.diffusion_loss(logits, x0, x_t, t, total_steps=16)
  np.testing.assert_allclose(loss, io["loss_total"], rtol=1e-5)
  np.testing.assert_allclose(metrics["bce_loss"], io["loss_bce_mean"], rtol=1e-5)
  np.testing.assert_allclose(metrics["acc"], io["loss_acc"], atol=1e-6)


def test_training_loss_draws_and_differentiates(io, denoiser):
  x0, labels = jnp.asarray(io["loss_x0"]), jnp.asarray(io["loss_label"])

  def loss_fn(model, key):
    return bd.training_loss(model, x0, key, schedule=bd.noise_schedule(16), labels=labels,
                            label_drop_prob=0.5)

  (loss, metrics), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(denoiser, jax.random.key(0))
  assert np.isfinite(loss) and loss > 0 and 0 <= metrics["acc"] <= 1
  assert float(jnp.abs(grads.head.kernel[...]).max()) > 0
  again, _ = nnx.jit(loss_fn)(denoiser, jax.random.key(0))
  np.testing.assert_allclose(again, loss, rtol=1e-6)


def test_loss_variants():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, 2, (2, 3, 4)), jnp.uint8)
  x_t = jnp.asarray(rng.integers(0, 2, (2, 3, 4)), jnp.uint8)
  t = jnp.array([1, 9])
  x0_logits = bd.flip_to_x0_logits(logits, x_t)
  plain, _ = bd.diffusion_loss(logits, x0, x_t, t, total_steps=16, loss_type="plain")
  bce = bd.bce_with_logits(x0_logits, x0.astype(jnp.float32))
  np.testing.assert_allclose(plain, jnp.mean(bce), rtol=1e-6)
  weighted, _ = bd.diffusion_loss(logits, x0, x_t, t, total_steps=16, loss_type="plain",
                                  loss_final="weighted")
  per_sample = jnp.mean(bce, axis=(1, 2))
  np.testing.assert_allclose(weighted, jnp.mean(per_sample * jnp.array([1.0, 1 - 8 / 16])), rtol=1e-6)
  # Balanced: each class's summed weight equals the other class's count times its own count / n.
  flips = np.logical_xor(np.asarray(x0), np.asarray(x_t))
  zero_logits = jnp.zeros_like(logits)  # every bce term = log 2
  balanced, _ = bd.diffusion_loss(zero_logits, x0, x_t, t, total_steps=16)
  f = flips.reshape(2, -1).mean(1)
  np.testing.assert_allclose(balanced, np.log(2) * np.mean(2 * f * (1 - f)), rtol=1e-6)


def test_posterior_matches_official_skipped_step(io):
  schedule = bd.noise_schedule(16)
  t, t_prev = int(io["post_t"][0]), int(io["post_t_prev"][0])
  post = bd.posterior(schedule, jnp.asarray(io["post_p0"]), jnp.asarray(io["post_x_t"]), t, t_prev)
  np.testing.assert_allclose(post, io["post_prob_x_tm1_eq_1"], atol=1e-6)


def test_posterior_is_exact_bayes():
  """Composed kernels give the true posterior q(x_s | x_t, x_0) for a known x_0."""
  schedule = bd.noise_schedule(10, "cos")
  t, s = 7, 3
  for x0 in (0.0, 1.0):
    for xt in (0, 1):
      prior_s = schedule.k_final[s] * x0 + schedule.b_final[s]  # P(x_s = 1 | x_0)
      stay = np.prod(schedule.beta[s + 1:t + 1])  # P(x_t = x_s) = stay + (1 - stay) / 2
      like = lambda xs: stay * (xs == xt) + (1 - stay) / 2
      expected = prior_s * like(1) / (prior_s * like(1) + (1 - prior_s) * like(0))
      got = bd.posterior(schedule, jnp.full((1,), x0), jnp.full((1,), xt, jnp.uint8), t, s)
      np.testing.assert_allclose(got[0], expected, rtol=1e-5)


def test_full_sampling_matches_official_with_recorded_noise(io, denoiser):
  np.testing.assert_array_equal(bd.sampling_steps(16, 6), io["samp_steps"])
  # x_T = (U < 0.5), then one Bernoulli draw per transition: 6 visited steps, 6 uniforms.
  noise = np.stack([io["samp_x_T_uniform"]] + [io[f"samp_step{i}_uniform"] for i in range(5)])
  x0, trajectory = bd.sample(
      denoiser, jax.random.key(0), batch=2, schedule=bd.noise_schedule(16), steps=6, temperature=0.9,
      guidance=2.0, labels=jnp.full((2,), 3), noise=noise, return_trajectory=True)
  for i in range(6):
    np.testing.assert_array_equal(trajectory[i], io[f"samp_step{i}_x_t"], err_msg=f"step {i}")
  np.testing.assert_array_equal(x0, io["samp_out_x0"])


def test_sampling_is_deterministic_given_a_key(denoiser):
  kwargs = dict(batch=2, schedule=bd.noise_schedule(16), steps=4, labels=jnp.array([1, 2]), guidance=1.0)
  a = bd.sample(denoiser, jax.random.key(3), **kwargs)
  b = bd.sample(denoiser, jax.random.key(3), **kwargs)
  c = bd.sample(denoiser, jax.random.key(4), **kwargs)
  assert a.shape == (2, 64, 32) and a.dtype == jnp.uint8
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


@pytest.mark.parametrize("total, steps", [(16, 16), (64, 16), (64, 64), (16, 1), (64, 7)])
def test_linspace_steps_descend_from_T_to_1(total, steps):
  visited = bd.sampling_steps(total, steps)
  assert len(visited) == steps and visited[-1] == 1 and np.all(np.diff(visited) < 0)
  assert steps == 1 or visited[0] == total


def test_even_spacing_and_explicit_steps():
  np.testing.assert_array_equal(bd.sampling_steps(64, 8, "even"), np.arange(64, 0, -9))
  np.testing.assert_array_equal(bd.sampling_steps(16, [16, 8, 1]), [16, 8, 1])


def test_bad_sampling_requests_raise(denoiser):
  schedule = bd.noise_schedule(16)
  with pytest.raises(ValueError, match=r"sampling steps \(17\) exceed the 16 diffusion steps"):
    bd.sampling_steps(16, 17)
  with pytest.raises(ValueError, match="must be >= 1"):
    bd.sampling_steps(16, 0)
  with pytest.raises(ValueError, match="divisible by steps - 1 = 15"):
    bd.sampling_steps(64, 16, "even")
  with pytest.raises(ValueError, match="descend strictly from T=16 to 1"):
    bd.sampling_steps(16, [16, 9, 9, 1])
  with pytest.raises(ValueError, match="descend strictly from T=16 to 1"):
    bd.sampling_steps(16, [12, 4, 1])
  with pytest.raises(ValueError, match="exceed"):
    bd.sample(denoiser, jax.random.key(0), batch=1, schedule=schedule, steps=32, labels=jnp.array([0]))
  with pytest.raises(ValueError, match="class-conditional"):
    bd.sample(denoiser, jax.random.key(0), batch=1, schedule=schedule, steps=4)
  with pytest.raises(ValueError, match="unknown beta_type"):
    bd.noise_schedule(16, "quadratic")
