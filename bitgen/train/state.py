"""The training state (a pytree of plain dicts and arrays) and its sharded creation.

The model is split into a static `graphdef`, its parameters (`nnx.Param`) and any other variables
(`extra`: RNG counters, statistics); all three are rebuilt into a module with `nnx.merge` inside the
step. Parameters are created directly on their shardings (jit with out_shardings), so no host ever
holds the whole model. A task's auxiliary module (a GAN discriminator, `bitgen.train.task`) is split
the same way into `aux_params`, `aux_extra` and its own optimizer state `aux_opt_state`; without
one these are empty, so such states (and their checkpoints) hold exactly the model's entries.
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
  aux_params: Any = flax.struct.field(default_factory=dict)     # the auxiliary's nnx.Param values
  aux_extra: Any = flax.struct.field(default_factory=dict)      # its other variables
  aux_opt_state: Any = flax.struct.field(default_factory=dict)  # optax state of `aux_params`


def _split(model: nnx.Module):
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(extra)


def abstract_graphdef(model_fn: Callable[[], nnx.Module]) -> nnx.GraphDef:
  """The graphdef of the model built by `model_fn()`, without allocating it."""
  return _split(nnx.eval_shape(model_fn))[0]


def _abstract_shardings(model_fn, mesh: Mesh, rules: Rules):
  """(graphdef, param shardings, extra shardings) of the model built by `model_fn()`, without
  allocating it."""
  abstract_model = nnx.eval_shape(model_fn)
  graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(state_shardings(abstract_params, mesh, rules))
  _, _, abstract_extra = _split(abstract_model)
  return graphdef, param_shardings, jax.tree.map(lambda _: replicated(mesh), abstract_extra)


def create_train_state(
    model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, mesh: Mesh,
    rules: Rules, seed: int, use_ema: bool,
    auxiliary_fn: Callable[[], nnx.Module] | None = None,
    auxiliary_tx: optax.GradientTransformation | None = None,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, state shardings) for the model built by `model_fn()`, sharded on `mesh`.

  With `auxiliary_fn` the state also holds that module (its graphdef: `abstract_graphdef`) and its
  `auxiliary_tx` state.
  """
  if (auxiliary_fn is None) != (auxiliary_tx is None):
    raise ValueError("create_train_state: pass both auxiliary_fn and auxiliary_tx, or neither")
  graphdef, param_shardings, extra_shardings = _abstract_shardings(model_fn, mesh, rules)
  _, aux_param_shardings, aux_extra_shardings = (
      _abstract_shardings(auxiliary_fn, mesh, rules) if auxiliary_fn else (None, {}, {}))

  def opt_shardings(opt, abstract_opt_state, shardings):
    return optax.tree_map_params(
        opt, lambda _, sharding: sharding, abstract_opt_state, shardings,
        transform_non_params=lambda _: replicated(mesh))

  def init():
    _, params, extra = _split(model_fn())
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(params),
        ema_params=params if use_ema else {}, rng=jax.random.PRNGKey(seed))
    if auxiliary_fn is None:
      return state
    _, aux_params, aux_extra = _split(auxiliary_fn())
    return state.replace(aux_params=aux_params, aux_extra=aux_extra,
                         aux_opt_state=auxiliary_tx.init(aux_params))

  abstract_state = jax.eval_shape(init)
  shardings = TrainState(
      step=replicated(mesh), params=param_shardings, extra=extra_shardings,
      opt_state=opt_shardings(tx, abstract_state.opt_state, param_shardings),
      ema_params=param_shardings if use_ema else {}, rng=replicated(mesh),
      aux_params=aux_param_shardings, aux_extra=aux_extra_shardings,
      aux_opt_state=(opt_shardings(auxiliary_tx, abstract_state.aux_opt_state, aux_param_shardings)
                     if auxiliary_fn else {}))
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings
