"""Logical axis names -> mesh axes: the rules table, parameter and batch shardings.

A rule maps one logical name (see `axes.py`) to a mesh axis, a tuple of mesh axes, or None
(replicated); names without a rule are replicated. A dimension whose size does not divide the size
of its mesh axes, or whose mesh axis is already used by an earlier dimension of the same array, falls
back to replicated, so any model shards on any mesh.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bitgen.parallel.axes import LOGICAL_AXES
from bitgen.parallel.mesh import with_auto_axes

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

# MaxText-style defaults: FSDP over the embedding dimension, tensor parallelism over the wide
# dimensions, batches over data x fsdp.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec of an array of `shape` whose dimensions carry `logical_axes`."""
  if len(logical_axes) != len(shape):
    raise ValueError(
        f"logical axes {tuple(logical_axes)} name {len(logical_axes)} dimensions, "
        f"but the array has shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    axes = _as_tuple(rules.get(name)) if name is not None else ()
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
      raise ValueError(f"rule for {name!r} names mesh axes {unknown} not in mesh {tuple(mesh.shape)}")
    extent = math.prod(mesh.shape[a] for a in axes)
    if not axes or size % extent or used.intersection(axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """Replaces every Variable of `state` (concrete or abstract) by its NamedSharding.

  Variables without `logical_axes` metadata (RNG counters, ...) are replicated.
  """

  def to_sharding(variable):
    names = variable.get_metadata().get(LOGICAL_AXES)
    shape = np.shape(variable.get_value())
    spec = P() if names is None else logical_to_spec(names, shape, mesh, rules)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a batch array: leading dimension over the mesh axes of the `batch` rule."""
  axes = _as_tuple(rules.get("batch"))
  return NamedSharding(mesh, P(axes if axes else None))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
  """How many shards the global batch is split into; the global batch size must be a multiple."""
  return math.prod(mesh.shape[a] for a in _as_tuple(rules.get("batch")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rules_from_config(rules: Mapping[str, Any] | None) -> dict[str, MeshAxes]:
  """The rules table from a config entry (a mapping; lists become tuples), defaults when None."""
  if rules is None:
    return dict(DEFAULT_RULES)
  return {str(k): (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(rules).items()}


def has_explicit_axes(mesh: Mesh) -> bool:
  return any(t == AxisType.Explicit for t in mesh.axis_types)


def under_auto_axes(fn, mesh: Mesh, out_sharding):
  """`fn` run under GSPMD propagation on a mesh with Explicit axes, so model code needs no sharding
  annotations (a reshape of a batch-sharded array would otherwise need its `out_sharding`); `fn`
  itself on other meshes. All arrays must reach `fn` as arguments: closed-over ones keep their types."""
  if has_explicit_axes(mesh):
    return jax.sharding.auto_axes(fn, out_sharding=out_sharding)
  return fn


def to_auto_axes(tree):
  """`tree` with every array kept in place but moved to its mesh's Auto-axes twin, so plain model
  code (eager calls, user jits) runs on it with GSPMD propagation instead of Explicit types."""
  def retype(x):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not has_explicit_axes(sharding.mesh):
      return x
    return jax.device_put(x, NamedSharding(with_auto_axes(sharding.mesh), sharding.spec))

  return jax.tree.map(retype, tree)
