"""Orbax checkpoints of the training state and the data iterator, with clear restore errors.

A checkpoint step holds three items: `state` (the sharded `TrainState`: step, params, optimizer
state, EMA, RNG, and a task's auxiliary module such as a GAN discriminator with its optimizer state;
saved asynchronously, each process writing its shards), `data` (the grain iterator
state, one JSON per process) and `meta` (JSON: format, step, the shape/dtype signature of every state
leaf and a free-form description of the model). Restoring compares the signature with the state
the current config builds, so a checkpoint of another model or shape fails with one error that names
the differing entries; unreadable or incomplete checkpoints fail with one error naming the step.
"""

from collections.abc import Mapping
import pathlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "bitgen-train-state-v1"
_SHOWN = 6  # differences listed in an error message


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into the current training state."""


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """Typed PRNG key arrays -> their uint32 data, which orbax can store."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template):
  return jax.tree.map(
      lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      tree, template)


def signature(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a state pytree (arrays or ShapeDtypeStructs)."""
  leaves = jax.tree_util.tree_flatten_with_path(_keys_to_data(tree))[0]
  return {_path_name(p): [list(np.shape(x)), str(x.dtype)] for p, x in leaves}


def _describe_mismatch(saved: Mapping[str, list], current: Mapping[str, list]) -> str:
  missing = sorted(set(current) - set(saved))
  unexpected = sorted(set(saved) - set(current))
  changed = sorted(k for k in set(saved) & set(current) if list(saved[k]) != list(current[k]))
  parts = []
  if changed:
    parts.append(f"{len(changed)} entries differ in shape/dtype (checkpoint vs model): " + ", ".join(
        f"{k}: {tuple(saved[k][0])} {saved[k][1]} vs {tuple(current[k][0])} {current[k][1]}"
        for k in changed[:_SHOWN]))
  if missing:
    parts.append(f"{len(missing)} entries missing from the checkpoint: {missing[:_SHOWN]}")
  if unexpected:
    parts.append(f"{len(unexpected)} entries not in the model: {unexpected[:_SHOWN]}")
  return "; ".join(parts)


def _has_state(iterator) -> bool:
  return hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


class Checkpointer:
  """Saves every `every` steps (and on request), keeps the newest `keep`, restores the latest."""

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int | None = 3,
               async_save: bool = True, description: Any = None):
    if every <= 0:
      raise ValueError(f"checkpoint every={every} must be a positive number of steps")
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self.description = description
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (any step when `force`); returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self.manager.all_steps():
      return False
    items = {
        "state": ocp.args.StandardSave(_keys_to_data(state)),
        "meta": ocp.args.JsonSave({"format": FORMAT, "step": int(step),
                                   "signature": signature(state),
                                   "description": self.description}),
    }
    if data_iterator is not None and _has_state(data_iterator):
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, state, data_iterator=None, step: int | None = None):
    """Restores `step` (default: the latest) into the shardings/shapes of `state`.

    Returns the restored state; `data_iterator` (if given and saved) is rewound in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no finished checkpoint in {self.directory}")
    where = f"checkpoint step {step} in {self.directory}"
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(f"{where} is corrupt or incomplete: its metadata cannot be read "
                            f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
      raise CheckpointError(f"{where} is not a bitgen training checkpoint (format "
                            f"{meta.get('format') if isinstance(meta, Mapping) else None!r})")
    mismatch = _describe_mismatch(meta["signature"], signature(state))
    if mismatch:
      raise CheckpointError(
          f"{where} was written by a different model or configuration "
          f"(saved: {meta.get('description')!r}, now: {self.description!r}): {mismatch}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(state))
    items = {"state": ocp.args.StandardRestore(target)}
    has_data = (self.directory / str(step) / "data").exists()
    if data_iterator is not None and _has_state(data_iterator) and has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(f"{where} is corrupt or incomplete: its state cannot be read "
                            f"({type(e).__name__}: {e})") from e
    return _data_to_keys(restored["state"], state)

  def wait(self):
    """Blocks until pending asynchronous saves are written."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info):
    self.close()
