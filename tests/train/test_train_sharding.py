"""One train step on a (2, 2, 2) mesh of 8 CPU devices equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import fixtures
from bitgen.parallel import DEFAULT_RULES, batch_sharding, global_batch, make_mesh
from bitgen.train.optimizer import learning_rate_schedule, make_optimizer
from bitgen.train.state import create_train_state
from bitgen.train.step import jit_train_step

TRAIN = {"lr": 1e-3, "warmup_steps": 1, "steps": 10}


def _one_step(mesh, images):
  task = fixtures.task()
  tx = make_optimizer(TRAIN)
  graphdef, state, shardings = create_train_state(
      lambda: task.build_model(nnx.Rngs(0)), tx, mesh=mesh, rules=DEFAULT_RULES, seed=0,
      use_ema=True)
  step = jit_train_step(graphdef, task=task, tx=tx, schedule=learning_rate_schedule(TRAIN),
                        ema_decay=0.999, mesh=mesh, state_shardings=shardings,
                        batch_sharding=batch_sharding(mesh, DEFAULT_RULES))
  with jax.set_mesh(mesh):
    state, metrics = step(state, global_batch({"image": images},
                                              batch_sharding(mesh, DEFAULT_RULES)))
  return state, metrics


@pytest.mark.parametrize("axis_types", ["explicit", pytest.param("auto", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(axis_types):
  images = fixtures.images(8)
  single, single_metrics = _one_step(
      make_mesh({"shape": (1, 1, 1), "devices": 1, "axis_types": axis_types}), images)
  sharded, sharded_metrics = _one_step(
      make_mesh({"shape": (2, 2, 2), "axis_types": axis_types}), images)
  # The parameters really are distributed: FSDP over embed, tensor over mlp.
  up = lambda params: params["encoder"]["transformer"]["blocks"][0]["mlp"]["up"]["kernel"]
  assert up(sharded.params).sharding.spec == P("fsdp", "tensor")
  assert up(sharded.opt_state[0].mu).sharding.spec == P("fsdp", "tensor")
  assert up(sharded.params).addressable_shards[0].data.shape == (16, 64)  # (32, 128) / (2, 2)
  for name in single_metrics:
    np.testing.assert_allclose(sharded_metrics[name], single_metrics[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, float reordering of the
  # sharded reductions moves it by a fraction of lr (1e-3), hence atol 1e-5 on the state.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
      sharded, single)
