"""The train step: a pure function of (graphdef, state, batch), jitted with shardings.

One step: loss and gradients of the task on the merged model, the optimizer update, the EMA update,
and scalar metrics (the task's, plus loss, grad_norm, lr). The state buffer is donated.

With an auxiliary module (a GAN discriminator, see `bitgen.train.task.AuxiliaryTask`) the step then
updates it too, as the official two-optimizer loop does: the model's loss sees the auxiliary with its
current parameters (not differentiated); the auxiliary's loss sees the model's outputs of this step
(the pre-update reconstructions, gradients stopped); the auxiliary's parameters keep their values
while `task.auxiliary_active(step)` is false. The model and auxiliary draw their keys by splitting
the step's key. Metrics add `aux_loss` and `aux_grad_norm`.

On a mesh with Explicit axes the state carries its shardings in its types, but the model's forward
and backward pass runs under `jax.sharding.auto_axes` (GSPMD propagation): model code needs no
sharding annotations, and its gradients come back on the parameters' shardings.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P, Sharding

from bitgen.parallel.sharding import has_explicit_axes, replicated
from bitgen.train.ema import ema_update
from bitgen.train.state import TrainState
from bitgen.train.task import Task


def _specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


def train_step(graphdef: nnx.GraphDef, state: TrainState, batch, *, task: Task,
               tx: optax.GradientTransformation, schedule: optax.Schedule | None,
               ema_decay: float | None, param_shardings=None,
               aux_graphdef: nnx.GraphDef | None = None, aux_tx: optax.GradientTransformation | None = None, aux_param_shardings=None,
               batch_spec: P = P()) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; `param_shardings` (on an Explicit mesh) places the gradients.

  `aux_graphdef`, `aux_tx` (and on an Explicit mesh `aux_param_shardings`, with `batch_spec` the
  batch's PartitionSpec) add the auxiliary module's update.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  if aux_graphdef is not None:
    rng, aux_rng = jax.random.split(rng)

  def loss_fn(params, extra, batch, step, rng):
    model = nnx.merge(graphdef, params, extra)
    loss, metrics = task.loss(model, batch, step=step, rng=rng)
    return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

  def loss_with_auxiliary_fn(params, extra, aux_params, aux_extra, batch, step, rng):
    model = nnx.merge(graphdef, params, extra)
    auxiliary = nnx.merge(aux_graphdef, aux_params, aux_extra)
    loss, metrics, outputs = task.loss_with_auxiliary(model, auxiliary, batch, step=step, rng=rng)
    return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))), outputs)

  if aux_graphdef is None:
    grad_fn, aux_specs = jax.value_and_grad(loss_fn, has_aux=True), (P(), P())
    args = (state.params, state.extra, batch, state.step, rng)
  else:  # the outputs for the auxiliary's loss stay sharded like the batch
    grad_fn = jax.value_and_grad(loss_with_auxiliary_fn, has_aux=True)
    aux_specs = (P(), P(), batch_spec)
    args = (state.params, state.extra, state.aux_params, state.aux_extra, batch, state.step, rng)
  if param_shardings is not None:
    grad_fn = jax.sharding.auto_axes(
        grad_fn, out_sharding=((P(), aux_specs), _specs(param_shardings)))
  (loss, (metrics, extra, *outputs)), grads = grad_fn(*args)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = ema_update(state.ema_params, params, ema_decay) if ema_decay else state.ema_params
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
  if schedule is not None:
    metrics["lr"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, extra=extra, opt_state=opt_state,
                            ema_params=ema_params)
  if aux_graphdef is not None:
    aux_updates, aux_metrics = _auxiliary_update(
        state, jax.lax.stop_gradient(outputs[0]), batch, aux_rng, task=task,
        aux_graphdef=aux_graphdef, aux_tx=aux_tx, aux_param_shardings=aux_param_shardings)
    new_state = new_state.replace(**aux_updates)
    metrics |= aux_metrics
  return new_state, metrics


def _auxiliary_update(state: TrainState, outputs, batch, rng, *, task, aux_graphdef, aux_tx,
                      aux_param_shardings):
  """The auxiliary module's step on the model's `outputs`: (new state fields, metrics)."""

  def aux_loss_fn(aux_params, aux_extra, outputs, batch, step, rng):
    auxiliary = nnx.merge(aux_graphdef, aux_params, aux_extra)
    loss, metrics = task.auxiliary_loss(auxiliary, outputs, batch, step=step, rng=rng)
    return loss, (metrics, nnx.to_pure_dict(nnx.state(auxiliary, nnx.Not(nnx.Param))))

  grad_fn = jax.value_and_grad(aux_loss_fn, has_aux=True)
  if aux_param_shardings is not None:
    grad_fn = jax.sharding.auto_axes(
        grad_fn, out_sharding=((P(), (P(), P())), _specs(aux_param_shardings)))
  (loss, (metrics, aux_extra)), grads = grad_fn(
      state.aux_params, state.aux_extra, outputs, batch, state.step, rng)
  updates, aux_opt_state = aux_tx.update(grads, state.aux_opt_state, state.aux_params)
  stepped = optax.apply_updates(state.aux_params, updates)
  active = task.auxiliary_active(state.step)
  aux_params = jax.tree.map(lambda new, old: jnp.where(active, new, old), stepped, state.aux_params)
  metrics = {**metrics, "aux_loss": loss, "aux_grad_norm": optax.tree.norm(grads)}
  return dict(aux_params=aux_params, aux_extra=aux_extra, aux_opt_state=aux_opt_state), metrics


def jit_train_step(graphdef: nnx.GraphDef, *, task: Task, tx: optax.GradientTransformation,
                   schedule: optax.Schedule | None, ema_decay: float | None, mesh: Mesh,
                   state_shardings: TrainState, batch_sharding: Sharding,
                   aux_graphdef: nnx.GraphDef | None = None,
                   aux_tx: optax.GradientTransformation | None = None):
  """`step(state, batch) -> (state, metrics)`, compiled with shardings, the state donated.

  `aux_graphdef` and `aux_tx` (both or neither) train the task's auxiliary module in the same step.
  """
  if (aux_graphdef is None) != (aux_tx is None):
    raise ValueError("jit_train_step: pass both aux_graphdef and aux_tx, or neither")
  explicit = has_explicit_axes(mesh)
  step = functools.partial(
      train_step, graphdef, task=task, tx=tx, schedule=schedule, ema_decay=ema_decay,
      param_shardings=state_shardings.params if explicit else None,
      aux_graphdef=aux_graphdef, aux_tx=aux_tx,
      aux_param_shardings=state_shardings.aux_params if explicit and aux_graphdef else None,
      batch_spec=batch_sharding.spec)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
