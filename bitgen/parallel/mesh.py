"""The device mesh: axes (data, fsdp, tensor), built from `config.mesh`.

`config.mesh.shape` gives one size per axis; a single -1 is filled with the devices left over
(`(1, -1, 1)` = all devices on fsdp). `config.mesh.devices` (default: all) uses only the first N
devices, e.g. 1 to train on one device of many. `config.mesh.axis_types` is "explicit" (default: shardings are
part of the array types, see JAX's explicit sharding) or "auto" (GSPMD propagation).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
_AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the one -1 in `shape` so that the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must give one size per axis {MESH_AXES}")
  if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1 (fill)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
        f"but {num_devices} are available")
  return shape


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh from `mesh_config` {shape, axis_types, devices}."""
  if devices is None:
    devices = jax.devices()
    count = mesh_config.get("devices")
    if count is not None:
      if not 0 < count <= len(devices):
        raise ValueError(f"mesh devices={count}: between 1 and {len(devices)} devices are available")
      devices = devices[:count]
  devices = list(devices)
  shape = resolve_shape(mesh_config.get("shape", (1, -1, 1)), len(devices))
  kind = mesh_config.get("axis_types", "explicit")
  if kind not in _AXIS_TYPES:
    raise ValueError(f"mesh axis_types {kind!r} unknown; expected one of {sorted(_AXIS_TYPES)}")
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(_AXIS_TYPES[kind],) * len(MESH_AXES), devices=devices)


def with_auto_axes(mesh: Mesh) -> Mesh:
  """The same devices and axes, all of type Auto (arrays placed on it carry no sharding types)."""
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
