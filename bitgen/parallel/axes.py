"""Logical axis names on parameters.

Every parameter is created with `with_axes(init, names)`, which records the logical names of its
dimensions (`embed`, `mlp`, `heads`, `kv`, `vocab`, `conv_in`, `conv_out`, ... or None) as the
variable metadata `logical_axes`. A rules table in the config maps them to mesh axes
(see `bitgen.parallel.sharding`), so model code never names a mesh axis.
"""

from flax import nnx

LOGICAL_AXES = "logical_axes"


def with_axes(initializer, axes: tuple[str | None, ...]):
  """Wraps an initializer so the created variable carries `axes` as its logical axis names."""
  return nnx.with_metadata(initializer, **{LOGICAL_AXES: tuple(axes)})
