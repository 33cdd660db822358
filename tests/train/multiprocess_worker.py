"""One process of the 2-process CPU training test (started by test_multiprocess.py).

argv: process_id num_processes port workdir. Trains the shrunken BSQ-ViT on the embedded photos
(each process reading its share of every global batch) for 2 steps with a checkpoint at step 2,
then restores that checkpoint (state and data iterator) into a zeroed state and a fresh iterator;
writes what it saw to <workdir>/process_<id>.json.
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from bitgen import data, parallel  # pylint: disable=g-import-not-at-top
from bitgen.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
from bitgen.train import run  # pylint: disable=g-import-not-at-top
import fixtures  # pylint: disable=g-import-not-at-top


def _equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x.data), np.asarray(y.data))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
             for x, y in zip(u.addressable_shards, v.addressable_shards))


def main():
  process_id, num_processes, port, workdir = sys.argv[1:5]
  parallel.initialize(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                      process_id=int(process_id))
  workdir = pathlib.Path(workdir)
  config = fixtures.config(2, mesh=(2, -1, 1), devices=None, every=2)
  config["log"]["grid_every"] = 0
  result = run(config, workdir / "run")
  checkpointer = Checkpointer(workdir / "run" / "checkpoints", every=2)
  batches = iter(data.make_pipeline(config["data"], split="train", batch_size=8, seed=0))
  fresh_data_state = batches.get_state()
  restored = checkpointer.restore(jax.tree.map(jnp.zeros_like, result.state), batches)
  checkpointer.close()
  saved_data = workdir / "run" / "checkpoints" / "2" / "data" / f"process_{process_id}-of-2.json"
  report = {
      "process_count": jax.process_count(),
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
      "steps": [h["step"] for h in result.history],
      "loss": result.history[-1]["loss"],
      "restored_step": int(restored.step),
      "restored_equal": _equal(restored, result.state),
      "fresh_data_state": fresh_data_state,
      "data_state": batches.get_state(),
      "saved_data_state": json.loads(saved_data.read_text()),
  }
  (workdir / f"process_{process_id}.json").write_text(json.dumps(report))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
