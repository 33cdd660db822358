"""One process of the 2-process CPU training test (started by test_multiprocess.py).

argv: process_id num_processes port workdir. Trains 2 steps, then resumes from the checkpoint to 4,
and writes what it saw to <workdir>/process_<id>.json.
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # pylint: disable=g-import-not-at-top

from bitgen import parallel  # pylint: disable=g-import-not-at-top
from bitgen.train import run  # pylint: disable=g-import-not-at-top
import fixtures  # pylint: disable=g-import-not-at-top


def main():
  process_id, num_processes, port, workdir = sys.argv[1:5]
  parallel.initialize(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                      process_id=int(process_id))
  workdir = pathlib.Path(workdir)
  config = fixtures.config(2, mesh=(2, -1, 1), devices=None, every=2)
  config["log"]["grid_every"] = 0
  per_process = parallel.per_process_batch_size(config["train"]["batch_size"])
  first = run(config, workdir / "run", task=fixtures.task(),
              train_data=fixtures.grain_batches(per_process, seed=jax.process_index()))
  config["train"]["steps"] = 4
  second = run(config, workdir / "run", task=fixtures.task(),
               train_data=fixtures.grain_batches(per_process, seed=jax.process_index()))
  kernel = second.state.params["up"]["kernel"]
  local = [np.asarray(s.data) for s in kernel.addressable_shards]
  report = {
      "process_count": jax.process_count(),
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
      "first_steps": [h["step"] for h in first.history],
      "second_steps": [h["step"] for h in second.history],
      "loss": second.history[-1]["loss"],
      "step": int(second.state.step),
      "kernel_shard_sum": float(sum(x.sum() for x in local)),
  }
  (workdir / f"process_{process_id}.json").write_text(json.dumps(report))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
