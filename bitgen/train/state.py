"""The training state (a pytree of plain dicts and arrays) and its sharded creation.

The model is split into a static `graphdef`, its parameters (`nnx.Param`) and any other variables
(`extra`: RNG counters, statistics); all three are rebuilt into a module with `nnx.merge` inside the
step. Parameters are created directly on their shardings (jit with out_shardings), so no host ever
holds the whole model.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from bitgen.parallel.sharding import Rules, replicated, state_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32, number of optimizer steps taken
  params: Any            # nested dict of nnx.Param values
  extra: Any             # nested dict of the model's other variables
  opt_state: Any         # optax state of `params`
  ema_params: Any        # EMA of `params`; {} when EMA is off
  rng: jax.Array         # (2,) uint32 raw key; the step's key is fold_in(rng, step)


def _split(model: nnx.Module):
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(extra)


def create_train_state(
    model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, mesh: Mesh,
    rules: Rules, seed: int, use_ema: bool,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, state shardings) for the model built by `model_fn()`, sharded on `mesh`."""
  abstract_model = nnx.eval_shape(model_fn)
  graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(state_shardings(abstract_params, mesh, rules))
  _, _, abstract_extra = _split(abstract_model)

  def opt_shardings(abstract_opt_state):
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated(mesh))

  def init():
    _, params, extra = _split(model_fn())
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(params),
        ema_params=params if use_ema else {}, rng=jax.random.PRNGKey(seed))

  abstract_state = jax.eval_shape(init)
  shardings = TrainState(
      step=replicated(mesh), params=param_shardings,
      extra=jax.tree.map(lambda _: replicated(mesh), abstract_extra),
      opt_state=opt_shardings(abstract_state.opt_state),
      ema_params=param_shardings if use_ema else {}, rng=replicated(mesh))
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings
