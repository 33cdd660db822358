"""The GAN term in training: the discriminator trains in the jitted step, respects its start step,
is checkpointed, and a resumed step sequence equals a straight one (the full trainer's N -> 2N
resume with the GAN on is the slow test at the end)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures
from bitgen.parallel import DEFAULT_RULES, batch_sharding, global_batch, make_mesh
from bitgen.train import restore, run
from bitgen.train.checkpoint import Checkpointer
from bitgen.train.optimizer import learning_rate_schedule, make_optimizer
from bitgen.train.state import abstract_graphdef, create_train_state
from bitgen.train.step import jit_train_step

# A discriminator of widths 8 and 16 for the 16 px fixtures.
GAN = {"gan_weight": 0.1, "gan_channel_base": 128, "gan_channel_max": 16}
TRAIN = {"lr": 1e-3, "warmup_steps": 1, "steps": 10}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


class _Trainer:
  """One compiled GAN train step on one device (gan_start 2, adaptive weight, R1 every 2 steps),
  shared by the tests below; `fresh()` is a new initial state."""

  def __init__(self, mesh_shape=(1, 1, 1)):
    self.task = task = fixtures.task(**GAN, gan_start=2, gan_r1_gamma=10.0, gan_r1_every=2,
                                     gan_adaptive_layer="decoder/to_pixels/kernel")
    devices = 1 if mesh_shape == (1, 1, 1) else None
    self.mesh = make_mesh({"shape": mesh_shape, "devices": devices})
    self.tx, self.aux_tx = make_optimizer(TRAIN), make_optimizer(TRAIN)
    self.auxiliary_fn = lambda: task.build_auxiliary(nnx.Rngs(1))
    graphdef, state, self.shardings = create_train_state(
        lambda: task.build_model(nnx.Rngs(0)), self.tx, mesh=self.mesh, rules=DEFAULT_RULES,
        seed=0, use_ema=False, auxiliary_fn=self.auxiliary_fn, auxiliary_tx=self.aux_tx)
    self.initial = jax.device_get(state)  # (initialisation compiles slowly on CPU: done once)
    self.sharding = batch_sharding(self.mesh, DEFAULT_RULES)
    self.step = jit_train_step(
        graphdef, task=task, tx=self.tx, schedule=learning_rate_schedule(TRAIN), ema_decay=None,
        mesh=self.mesh, state_shardings=self.shardings, batch_sharding=self.sharding,
        aux_graphdef=abstract_graphdef(self.auxiliary_fn), aux_tx=self.aux_tx)
    self.images = fixtures.images(8)

  def fresh(self):
    return jax.device_put(self.initial, self.shardings)

  def run(self, state, count):
    """(state after `count` steps, host copies of the states before/after each step, metrics)."""
    states, metrics = [jax.device_get(state)], []
    with jax.set_mesh(self.mesh):
      for _ in range(count):
        state, m = self.step(state, global_batch({"image": self.images}, self.sharding))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return state, states, metrics


@functools.cache
def _trainer(mesh_shape=(1, 1, 1)) -> _Trainer:
  return _Trainer(mesh_shape)


def test_gan_start_adaptive_weight_and_r1_in_the_step():
  trainer = _trainer()
  _, states, metrics = trainer.run(trainer.fresh(), 3)
  assert [float(m["gan/disc_factor"]) for m in metrics] == [0.0, 0.0, 1.0]
  # Before the start the discriminator keeps its weights (its optimizer still counts steps) and
  # the generator's loss has no adversarial term ...
  for before, after in zip(_leaves(states[0].aux_params), _leaves(states[2].aux_params)):
    np.testing.assert_array_equal(before, after)
  for m in metrics[:2]:
    np.testing.assert_allclose(
        float(m["loss"]), float(m["nll"] + m["codebook_weight"] * m["quant_loss"]), rtol=1e-6)
  # ... from the start it has, with the adaptive weight, and the discriminator moves.
  assert any(not np.array_equal(a, b)
             for a, b in zip(_leaves(states[2].aux_params), _leaves(states[3].aux_params)))
  m = metrics[2]
  d_weight = float(m["gan/d_weight"])
  assert np.isfinite(d_weight) and d_weight > 0 and d_weight != 0.1
  np.testing.assert_allclose(
      float(m["loss"]),
      float(m["nll"] + m["codebook_weight"] * m["quant_loss"] + d_weight * m["gan/g_loss"]),
      rtol=1e-5)
  assert float(m["aux_grad_norm"]) > 0
  # Lazy R1 on steps 1 and 3 ((step + 1) % 2 == 0), logged as 0 otherwise.
  assert [float(m["gan/r1"]) > 0 for m in metrics] == [False, True, False]


def test_gan_step_resumes_bit_exactly_from_a_checkpoint(tmp_path):
  trainer = _trainer()
  state, _, _ = trainer.run(trainer.fresh(), 2)
  with Checkpointer(tmp_path / "ckpt", every=2) as checkpointer:
    checkpointer.save(2, state)
  straight, _, _ = trainer.run(state, 2)
  with Checkpointer(tmp_path / "ckpt", every=2) as checkpointer:
    restored = checkpointer.restore(trainer.fresh())
  resumed, _, _ = trainer.run(restored, 2)
  assert int(resumed.step) == 4
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               resumed, straight)
  meta = (tmp_path / "ckpt" / "2" / "meta" / "metadata").read_text()
  assert "aux_params/blocks/0/conv0/kernel" in meta and "aux_opt_state" in meta


@pytest.mark.slow
def test_sharded_gan_steps_match_single_device():
  single, sharded = _trainer(), _trainer((2, 2, 2))
  _, single_states, single_metrics = single.run(single.fresh(), 3)
  state, sharded_states, sharded_metrics = sharded.run(sharded.fresh(), 3)
  assert jax.tree.leaves(state.aux_params)[0].sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  for s_metrics, m_metrics in zip(single_metrics, sharded_metrics):
    for name in s_metrics:
      np.testing.assert_allclose(m_metrics[name], s_metrics[name], rtol=1e-4, atol=1e-5,
                                 err_msg=name)
  # As in test_train_sharding: Adam's early steps amplify float reordering where |g| ~ eps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               sharded_states[-1], single_states[-1])


@pytest.mark.slow
def test_gan_run_resumes_bit_exactly_and_checkpoints_the_discriminator(tmp_path):
  n = 3
  loss = GAN
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
  meta = (tmp_path / "straight" / "checkpoints" / "6" / "meta" / "metadata").read_text()
  assert "aux_params/blocks/0/conv0/kernel" in meta and "aux_opt_state" in meta

