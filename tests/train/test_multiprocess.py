"""Two jax.distributed CPU processes (gloo) train a few steps, checkpoint and resume."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

import fixtures

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_checkpoint_and_restore(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BITGEN_TEST_PHOTOS_DIR": fixtures.photos_dir(),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
  procs = [
      subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(i), "2",
                        str(port), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("the 2-process run did not finish in 240 s")
    outputs.append(out)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  reports = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  for report in reports:
    assert report["process_count"] == 2 and report["devices"] == 4
    assert report["local_devices"] == 2
    assert report["steps"] == [1, 2]
    assert report["restored_step"] == 2 and report["restored_equal"]
    assert report["data_state"] == report["saved_data_state"] != report["fresh_data_state"]
  assert reports[0]["loss"] == reports[1]["loss"]  # one global loss
  data_states = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "2" / "data").iterdir()
                       if p.suffix == ".json")
  assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
