"""The launch scripts cannot reach a TPU pod or a GPU host here: their --dry-run plans are tested."""

import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"


def dry_run(script: str, *args: str) -> list[list[str]]:
  out = subprocess.run(
      ["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True, check=True)
  return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def run_failing(script: str, *args: str) -> str:
  out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True)
  assert out.returncode != 0
  return out.stderr


def test_tpu_pod_plan_creates_installs_and_trains_on_all_workers():
  cmds = dry_run("tpu_pod.sh", "--name", "pod", "--zone", "us-west4-a", "--accelerator",
                 "v5litepod-16", "--config", "bsq_vit:b18", "--workdir", "gs://b/run", "--spot",
                 "--", "--set", "train.steps=10")
  create, archive, scp, install, train = cmds
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"--accelerator-type", "v5litepod-16", "--spot", "us-west4-a"} <= set(create)
  assert archive[:3] == ["git", "-C", str(LAUNCH.parent)]
  for cmd in (scp, install, train):
    assert "--worker=all" in cmd
  assert "pip install" in install[install.index("--command") + 1]
  command = shlex.split(train[train.index("--command") + 1])
  assert command[command.index("-m"):] == [
      "-m", "bitgen", "train", "--config", "bsq_vit:b18", "--workdir", "gs://b/run",
      "--set", "train.steps=10"]


def test_tpu_pod_requires_its_arguments():
  assert "--zone is required" in run_failing(
      "tpu_pod.sh", "--name", "pod", "--accelerator", "v5litepod-16", "--config", "c", "--workdir", "w")
  assert "unknown argument --bogus" in run_failing("tpu_pod.sh", "--bogus")


def test_gpu_host_process_per_gpu_joins_one_coordinator():
  cmds = dry_run("gpu_host.sh", "--config", "bsq_vit:tiny", "--workdir", "runs/x", "--gpus", "4",
                 "--mode", "process-per-gpu", "--port", "4242")
  assert len(cmds) == 4
  for i, cmd in enumerate(cmds):
    assert f"CUDA_VISIBLE_DEVICES={i}" in cmd
    assert cmd[cmd.index("--coordinator") + 1] == "localhost:4242"
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--process_id") + 1] == str(i)


def test_gpu_host_single_process_sees_every_gpu():
  (cmd,) = dry_run("gpu_host.sh", "--config", "c", "--workdir", "w", "--gpus", "3")
  assert "CUDA_VISIBLE_DEVICES=0,1,2" in cmd
  assert "--coordinator" not in cmd


@pytest.mark.parametrize("args, message", [
    (("--config", "c", "--gpus", "2"), "--workdir is required"),
    (("--config", "c", "--workdir", "w", "--gpus", "2", "--mode", "bogus"), "--mode must be"),
])
def test_gpu_host_bad_arguments(args, message):
  assert message in run_failing("gpu_host.sh", *args, "--dry-run")
