"""Multi-process start-up and global batches assembled from per-process data.

`initialize` starts `jax.distributed` from arguments or the environment
(`BITGEN_COORDINATOR_ADDRESS`, `BITGEN_NUM_PROCESSES`, `BITGEN_PROCESS_ID`, `BITGEN_LOCAL_DEVICE_IDS`;
`BITGEN_DISTRIBUTED=auto` lets JAX detect the cluster, as on a Cloud TPU pod or under SLURM). With
none of them set it does nothing: one process needs no coordinator.
"""

from collections.abc import Mapping, Sequence
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
  """Starts jax.distributed when several processes are configured; returns whether it is running."""
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("BITGEN_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("BITGEN_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("BITGEN_PROCESS_ID")
  if local_device_ids is None and os.environ.get("BITGEN_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(i) for i in os.environ["BITGEN_LOCAL_DEVICE_IDS"].split(",")]
  if os.environ.get("BITGEN_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
    return True
  if coordinator_address is None and num_processes in (None, 1):
    return False
  missing = [name for name, value in (("coordinator_address", coordinator_address),
                                      ("num_processes", num_processes),
                                      ("process_id", process_id)) if value is None]
  if missing:
    raise ValueError(
        f"multi-process start needs {missing} (arguments or BITGEN_* environment variables)")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids)
  return True


def per_process_batch_size(global_batch_size: int) -> int:
  """The batch each process loads; the global batch must split evenly over processes."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by {count} processes")
  return global_batch_size // count


def global_batch(local_batch: Mapping[str, Any], sharding: Sharding) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's part (leading dimension = batch)."""
  return {
      name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for name, value in local_batch.items()
  }
