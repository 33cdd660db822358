"""The training loop end to end: resume equivalence, outputs on disk, checkpoint errors."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fixtures
from bitgen.parallel import DEFAULT_RULES, make_mesh
from bitgen.train import run
from bitgen.train.checkpoint import Checkpointer, CheckpointError
from bitgen.train.optimizer import make_optimizer
from bitgen.train.state import create_train_state
from bitgen.models.bsq_vit import BSQViT


def _assert_states_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_stop_and_resume_equals_straight_run(tmp_path):
  n = 3
  first = run(fixtures.config(n), tmp_path / "resumed")
  assert int(first.state.step) == n
  resumed = run(fixtures.config(2 * n), tmp_path / "resumed")
  straight = run(fixtures.config(2 * n), tmp_path / "straight")
  assert [h["step"] for h in resumed.history] == [4, 5, 6]
  _assert_states_equal(resumed.state, straight.state)
  assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]
  # The EMA moved away from the parameters, and the parameters away from their start.
  ema, params = resumed.state.ema_params, resumed.state.params
  assert any(not np.array_equal(np.asarray(e), np.asarray(p))
             for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))

  workdir = tmp_path / "resumed"
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert {"loss", "l1", "lr", "grad_norm", "steps_per_second"} <= set(lines[0])
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  grid = np.asarray(Image.open(workdir / "grids" / "step_0000006.png"))
  assert grid.shape == (2 * fixtures.IMAGE, 4 * 2 * fixtures.IMAGE, 3)  # 8 pairs, 4 per row
  # keep=2: only the two newest of the saved steps remain.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
  model = resumed.model(ema=True)
  assert isinstance(model, BSQViT)


def _state(bits: int, group_size: int = 9):
  mesh = make_mesh({"shape": (1, -1, 1)}, devices=jax.devices()[:1])
  tx = make_optimizer({"steps": 10})
  task = fixtures.task(bits, group_size)
  _, state, _ = create_train_state(lambda: task.build_model(nnx.Rngs(0)), tx, mesh=mesh,
                                   rules=DEFAULT_RULES, seed=0, use_ema=True)
  return state


def _save(directory, state, step=2):
  with Checkpointer(directory, every=2) as checkpointer:
    checkpointer.save(step, state)


def _restore(directory, state):
  with Checkpointer(directory, every=2) as checkpointer:
    return checkpointer.restore(state)


def test_restore_round_trip_and_missing_checkpoint(tmp_path):
  state = _state(18)
  with pytest.raises(CheckpointError, match="no finished checkpoint"):
    _restore(tmp_path / "ckpt", state)
  _save(tmp_path / "ckpt", state)
  restored = _restore(tmp_path / "ckpt", jax.tree.map(lambda x: x * 0, state))
  _assert_states_equal(restored, state)


def test_restore_from_other_model_names_the_difference(tmp_path):
  _save(tmp_path / "ckpt", _state(18))
  with pytest.raises(CheckpointError,
                     match=r"different model.*params/quant_embed/kernel: \(32, 18\) float32 vs \(32, 16\)"):
    _restore(tmp_path / "ckpt", _state(16, 8))


def test_corrupt_or_partial_checkpoint_is_reported(tmp_path):
  state = _state(18)
  _save(tmp_path / "ckpt", state)
  step_dir = tmp_path / "ckpt" / "2"
  # Lose the array data of the state item (as after a partial copy).
  for path in sorted((step_dir / "state").rglob("*")):
    if path.is_file() and "manifest" not in path.name and path.parent.name == "d":
      path.write_bytes(b"")
  with pytest.raises(CheckpointError, match="step 2 .* corrupt or incomplete: its state"):
    _restore(tmp_path / "ckpt", state)
  (step_dir / "meta" / "metadata").write_text("{not json")
  with pytest.raises(CheckpointError, match="corrupt or incomplete: its metadata"):
    _restore(tmp_path / "ckpt", state)
