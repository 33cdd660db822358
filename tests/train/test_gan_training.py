"""The GAN term in training: the discriminator trains in the jitted step, respects its start step,
is checkpointed, and a resumed run equals a straight one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fixtures
from bitgen.parallel import DEFAULT_RULES, batch_sharding, global_batch, make_mesh
from bitgen.train import restore, run
from bitgen.train.optimizer import learning_rate_schedule, make_optimizer
from bitgen.train.state import abstract_graphdef, create_train_state
from bitgen.train.step import jit_train_step

# A discriminator of widths 8 and 16 for the 16 px fixtures.
GAN = {"gan_weight": 0.1, "gan_channel_base": 128, "gan_channel_max": 16}
TRAIN = {"lr": 1e-3, "warmup_steps": 1, "steps": 10}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _steps(task, images, count, *, with_auxiliary=True):
  """States after each of `count` single-device steps of `task` on `images`, and the metrics."""
  mesh = make_mesh({"shape": (1, 1, 1), "devices": 1})
  tx = make_optimizer(TRAIN)
  aux = dict(auxiliary_fn=lambda: task.build_auxiliary(nnx.Rngs(1)),
             auxiliary_tx=make_optimizer(TRAIN)) if with_auxiliary else {}
  graphdef, state, shardings = create_train_state(
      lambda: task.build_model(nnx.Rngs(0)), tx, mesh=mesh, rules=DEFAULT_RULES, seed=0,
      use_ema=False, **aux)
  sharding = batch_sharding(mesh, DEFAULT_RULES)
  step = jit_train_step(
      graphdef, task=task, tx=tx, schedule=learning_rate_schedule(TRAIN), ema_decay=None, mesh=mesh,
      state_shardings=shardings, batch_sharding=sharding,
      aux_graphdef=abstract_graphdef(aux["auxiliary_fn"]) if with_auxiliary else None,
      aux_tx=aux.get("auxiliary_tx"))
  states, metrics = [jax.device_get(state)], []
  with jax.set_mesh(mesh):
    for _ in range(count):
      state, m = step(state, global_batch({"image": images}, sharding))
      states.append(jax.device_get(state))
      metrics.append(jax.device_get(m))
  return states, metrics


def test_gan_start_step_is_respected():
  images = fixtures.images(8)
  states, metrics = _steps(fixtures.task(**GAN, gan_start=2), images, 3)
  plain, _ = _steps(fixtures.task(), images, 1, with_auxiliary=False)
  assert [float(m["gan/disc_factor"]) for m in metrics] == [0.0, 0.0, 1.0]
  # Before the start the discriminator keeps its weights (its optimizer still counts steps) ...
  for before, after in zip(_leaves(states[0].aux_params), _leaves(states[2].aux_params)):
    np.testing.assert_array_equal(before, after)
  assert any(not np.array_equal(a, b)
             for a, b in zip(_leaves(states[2].aux_params), _leaves(states[3].aux_params)))
  # ... and the generator's update is the GAN-free one (up to float reordering).
  for gan_on, gan_off in zip(_leaves(states[1].params), _leaves(plain[1].params)):
    np.testing.assert_allclose(gan_on, gan_off, rtol=1e-6, atol=1e-7)
  # From the start the adversarial term enters the generator's loss.
  m = metrics[2]
  np.testing.assert_allclose(
      float(m["loss"]),
      float(m["nll"] + m["codebook_weight"] * m["quant_loss"] + 0.1 * m["gan/g_loss"]), rtol=1e-5)
  assert float(m["aux_grad_norm"]) > 0


def test_adaptive_weight_at_the_decoder_output_layer():
  task = fixtures.task(**GAN, gan_adaptive_layer="decoder/to_pixels/kernel")
  _, metrics = _steps(task, fixtures.images(8), 1)
  d_weight = float(metrics[0]["gan/d_weight"])
  assert np.isfinite(d_weight) and d_weight > 0 and d_weight != 0.1


def test_gan_run_resumes_bit_exactly_and_checkpoints_the_discriminator(tmp_path):
  n = 3
  loss = {**GAN, "gan_r1_gamma": 10.0, "gan_r1_every": 2}
  first = run(fixtures.config(n, loss=loss), tmp_path / "resumed")
  # The discriminator is part of the state, and its third step (kept checkpoints: 2, 3) changed it.
  at_2 = restore(fixtures.config(n, loss=loss), tmp_path / "resumed", step=2).state.aux_params
  assert jax.tree.structure(at_2) == jax.tree.structure(first.state.aux_params)
  assert any(not np.array_equal(a, b)
             for a, b in zip(_leaves(at_2), _leaves(first.state.aux_params)))
  resumed = run(fixtures.config(2 * n, loss=loss), tmp_path / "resumed")
  straight = run(fixtures.config(2 * n, loss=loss), tmp_path / "straight")
  assert [h["step"] for h in resumed.history] == [4, 5, 6]
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               resumed.state, straight.state)
  assert resumed.history[-1]["gan/d_loss"] == straight.history[-1]["gan/d_loss"]
  # R1 is applied on steps 2, 4, 6 ((step + 1) % 2 == 0 counting from 0) and logged as 0 otherwise.
  assert [h["gan/r1"] > 0 for h in straight.history] == [False, True] * 3
  meta = (tmp_path / "straight" / "checkpoints" / "6" / "meta" / "metadata").read_text()
  assert "aux_params/blocks/0/conv0/kernel" in meta and "aux_opt_state" in meta

