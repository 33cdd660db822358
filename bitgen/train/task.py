"""What the generic trainer needs from a model family: a "task".

A task builds its model and says how to turn (model, batch) into a scalar loss and metrics. The
trainer owns everything else (optimizer, EMA, sharding, checkpoints, logging), so a new family
(Infinity, BLD, ...) adds one task and reuses the loop. The tokenizer task
(`bitgen.train.tokenizer.TokenizerTask`) is the first.
"""

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
from flax import nnx


class Task(Protocol):
  """The contract between a model family and `bitgen.train.trainer`."""

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """A freshly initialised model; called under `nnx.eval_shape` and inside `jax.jit`."""

  def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], *, step: jax.Array,
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss to minimise, named scalar metrics); pure and traceable under `jax.jit`."""

  def visualize(self, model: nnx.Module, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Images for the progress grid: {"inputs": [B,H,W,3], "outputs": [B,H,W,3]} in [-1, 1]."""


class AuxiliaryTask(Task, Protocol):
  """The optional methods of a task with an auxiliary module (see `auxiliary_of`)."""

  def build_auxiliary(self, rngs: nnx.Rngs) -> nnx.Module | None:
    """The freshly initialised auxiliary module, or None when this configuration needs none."""

  def loss_with_auxiliary(
      self, model: nnx.Module, auxiliary: nnx.Module, batch: Mapping[str, jax.Array], *,
      step: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(model loss, metrics, outputs): `loss` with the auxiliary's help (only the model is
    differentiated); `outputs` (arrays with the batch axis first, e.g. the reconstructions) reach
    `auxiliary_loss` with their gradients stopped."""

  def auxiliary_loss(self, auxiliary: nnx.Module, outputs: Any, batch: Mapping[str, jax.Array], *,
                     step: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(auxiliary loss to minimise, metrics) on the model's `outputs` of this step."""

  def auxiliary_active(self, step: jax.Array) -> jax.Array:
    """Whether the auxiliary's parameters change at `step` (e.g. a GAN's start step); its
    optimizer state advances every step either way."""


def auxiliary_of(task: Task) -> Callable[[nnx.Rngs], nnx.Module] | None:
  """`task.build_auxiliary` when the task has an auxiliary module in this configuration, else None."""
  build = getattr(task, "build_auxiliary", None)
  if build is None or nnx.eval_shape(lambda: build(nnx.Rngs(0))) is None:
    return None
  return build


def scalar_metrics(prefix: str, metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Flattens a metrics dict to scalars: scalars as they are, arrays by their mean (`name_mean`)."""
  out = {}
  for name, value in metrics.items():
    if getattr(value, "ndim", 0) == 0:
      out[f"{prefix}{name}"] = value
    else:
      out[f"{prefix}{name}_mean"] = value.mean()
  return out
