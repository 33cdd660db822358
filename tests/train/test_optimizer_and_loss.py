"""Optimizer schedule, AdamW settings, EMA and the tokenizer loss against the official formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitgen.train.ema import ema_update
from bitgen.train.optimizer import learning_rate_schedule, make_optimizer
from bitgen.train.tokenizer import TokenizerTask, codebook_weight, loss_config
import fixtures


def official_lr_multiplier(n, warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps):
  """transcoder/optim/schedulers.py LambdaWarmUpCosineScheduler.schedule, transcribed."""
  if n < warm_up_steps:
    return (lr_max - lr_start) / warm_up_steps * n + lr_start
  t = min((n - warm_up_steps) / (max_decay_steps - warm_up_steps), 1.0)
  return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(t * math.pi))


def test_schedule_matches_official_lambda_warmup_cosine():
  schedule = learning_rate_schedule({"lr": 2e-4, "warmup_steps": 50, "steps": 400})
  for n in [0, 1, 25, 49, 50, 51, 200, 399, 400, 1000]:
    expected = 2e-4 * official_lr_multiplier(n, 50, 0.5, 1.0, 0.1, 400)
    np.testing.assert_allclose(float(schedule(n)), expected, rtol=1e-5)


@pytest.mark.parametrize("config, match", [
    ({"lr": 1e-3, "warmup_steps": 10, "steps": 10}, "warmup_steps"),
    ({"lr": 1e-3, "warmup_steps": 0}, "decay_steps"),
])
def test_schedule_errors(config, match):
  with pytest.raises(ValueError, match=match):
    learning_rate_schedule(config)


def test_adamw_uses_official_hyperparameters():
  params = {"w": jnp.array([1.0, -2.0]), "norm": jnp.array([3.0])}
  grads = {"w": jnp.array([0.5, 0.25]), "norm": jnp.array([1.0])}
  tx = make_optimizer({"lr": 1e-2, "warmup_steps": 0, "steps": 10, "lr_start_factor": 1.0,
                       "lr_end_factor": 1.0, "no_decay": ["norm"]})
  # The first step of torch AdamW(betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-4): the bias-corrected
  # m/sqrt(v) is sign(g), so the update is -lr*(sign(g) + wd*p), without decay for "norm".
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2 * (1 + 1e-4 * np.array([1.0, -2.0])),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["norm"]), [-1e-2], rtol=1e-6)  # no decay
  with pytest.raises(ValueError, match="b1, b2"):
    make_optimizer({"betas": (0.9, 0.99), "steps": 10})


def test_grad_clip_limits_global_norm():
  # b1 = b2 = 0 and a large eps make the Adam step g / (|g| + eps): the clipped gradient shows.
  config = {"lr": 1.0, "steps": 10, "weight_decay": 0.0, "lr_start_factor": 1.0,
            "lr_end_factor": 1.0, "b1": 0.0, "b2": 0.0, "eps": 1e3}
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([30.0, 40.0])}
  for clip, g in [(1.0, np.array([0.6, 0.8])), (None, np.array([30.0, 40.0]))]:
    tx = make_optimizer({**config, "grad_clip_norm": clip})
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -g / (g + 1e3), rtol=1e-5)


def test_ema_update():
  ema = {"w": jnp.array([1.0, 2.0]), "count": jnp.array(3)}
  params = {"w": jnp.array([3.0, 0.0]), "count": jnp.array(7)}
  out = ema_update(ema, params, 0.9)
  np.testing.assert_allclose(np.asarray(out["w"]), [1.2, 1.8], rtol=1e-6)
  assert int(out["count"]) == 7


def test_codebook_weight_ramp_matches_official():
  def official(step, weight=0.1, multiplier=3.0, steps=2000):
    rate = min(steps, step) / steps
    return weight * (1.0 * rate + multiplier * (1 - rate))

  for step in [0, 1, 500, 1999, 2000, 5000]:
    np.testing.assert_allclose(float(codebook_weight(step, 0.1, 3.0, 2000)), official(step),
                               rtol=1e-6)
  assert float(codebook_weight(7, 0.1, 3.0, 0)) == pytest.approx(0.1)


def test_tokenizer_loss_is_l1_plus_weighted_quantizer_loss():
  task = TokenizerTask(fixtures.model_config())
  model = task.build_model(nnx.Rngs(0))
  images = jnp.asarray(fixtures.images(2))

  @nnx.jit
  def check(model, images, step):
    loss, metrics = task.loss(model, {"image": images}, step=step, rng=None)
    recon, q = model(images)
    grads = nnx.grad(lambda m: task.loss(m, {"image": images}, step=step, rng=None)[0])(model)
    return loss, metrics, recon, q.loss, grads

  loss, metrics, recon, quant_loss, grads = check(model, images, jnp.array(1000))
  expected = jnp.mean(jnp.abs(images - recon)) + 0.1 * (0.5 + 3.0 * 0.5) * quant_loss
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  assert set(metrics) >= {"l1", "quant_loss", "codebook_weight", "quantizer/commitment",
                          "quantizer/bit_entropy_mean"}
  assert float(jnp.abs(grads.quant_embed.kernel[...]).sum()) > 0


def test_loss_config_errors():
  with pytest.raises(ValueError, match="unknown loss key"):
    loss_config({"codebook_wieght": 0.1})
  with pytest.raises(ValueError, match="lpips_weights"):
    loss_config({"perceptual_weight": 0.1})
  with pytest.raises(ValueError, match="gan_loss"):
    loss_config({"gan_weight": 0.1, "gan_loss": "wgan"})
