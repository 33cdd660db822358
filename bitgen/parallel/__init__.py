"""Mesh, logical-axis sharding rules and multi-process helpers."""

from bitgen.parallel.axes import LOGICAL_AXES, with_axes
from bitgen.parallel.distributed import global_batch, initialize, per_process_batch_size
from bitgen.parallel.mesh import MESH_AXES, make_mesh, resolve_shape, with_auto_axes
from bitgen.parallel.sharding import (
    DEFAULT_RULES, batch_divisor, batch_sharding, has_explicit_axes, logical_to_spec, replicated,
    rules_from_config, state_shardings, to_auto_axes, under_auto_axes)
