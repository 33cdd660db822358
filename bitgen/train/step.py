"""The train step: a pure function of (graphdef, state, batch), jitted with shardings.

One step: loss and gradients of the task on the merged model, the optimizer update, the EMA update,
and scalar metrics (the task's, plus loss, grad_norm, lr). The state buffer is donated.

On a mesh with Explicit axes the state carries its shardings in its types, but the model's forward
and backward pass runs under `jax.sharding.auto_axes` (GSPMD propagation): model code needs no
sharding annotations, and its gradients come back on the parameters' shardings.
"""

import functools

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P, Sharding

from bitgen.parallel.sharding import has_explicit_axes, replicated
from bitgen.train.ema import ema_update
from bitgen.train.state import TrainState
from bitgen.train.task import Task


def train_step(graphdef: nnx.GraphDef, state: TrainState, batch, *, task: Task,
               tx: optax.GradientTransformation, schedule: optax.Schedule | None,
               ema_decay: float | None, param_shardings=None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; `param_shardings` (on an Explicit mesh) places the gradients."""
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params, extra, batch, step, rng):
    model = nnx.merge(graphdef, params, extra)
    loss, metrics = task.loss(model, batch, step=step, rng=rng)
    return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if param_shardings is not None:
    specs = jax.tree.map(lambda s: s.spec, param_shardings)
    grad_fn = jax.sharding.auto_axes(grad_fn, out_sharding=((P(), (P(), P())), specs))
  (loss, (metrics, extra)), grads = grad_fn(state.params, state.extra, batch, state.step, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = ema_update(state.ema_params, params, ema_decay) if ema_decay else state.ema_params
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
  if schedule is not None:
    metrics["lr"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, extra=extra, opt_state=opt_state,
                            ema_params=ema_params)
  return new_state, metrics


def jit_train_step(graphdef: nnx.GraphDef, *, task: Task, tx: optax.GradientTransformation,
                   schedule: optax.Schedule | None, ema_decay: float | None, mesh: Mesh,
                   state_shardings: TrainState, batch_sharding: Sharding):
  """`step(state, batch) -> (state, metrics)`, compiled with shardings, the state donated."""
  step = functools.partial(
      train_step, graphdef, task=task, tx=tx, schedule=schedule, ema_decay=ema_decay,
      param_shardings=state_shardings.params if has_explicit_axes(mesh) else None)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
