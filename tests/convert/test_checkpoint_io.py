"""Reading checkpoint files: formats, training-checkpoint wrappers, and corrupt or missing files."""

import importlib.util

import numpy as np
import pytest

from bitgen.convert.checkpoint_io import CheckpointError, load_state_dict, strip_prefix, unwrap

STATE = {"encoder.w": np.arange(6, dtype=np.float32).reshape(2, 3), "basis": np.array([4, 2, 1])}


def assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype
    np.testing.assert_array_equal(a[k], b[k])


def test_npz_and_safetensors_round_trip(tmp_path):
  from safetensors.numpy import save_file
  np.savez(tmp_path / "w.npz", **STATE)
  save_file(STATE, str(tmp_path / "w.safetensors"))
  assert_same(load_state_dict(tmp_path / "w.npz"), STATE)
  assert_same(load_state_dict(tmp_path / "w.safetensors"), STATE)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
  if suffix == ".pt" and importlib.util.find_spec("torch") is None:
    pytest.skip("torch not installed")
  full = tmp_path / f"full{suffix}"
  if suffix == ".pt":
    import torch
    torch.save({k: torch.from_numpy(v) for k, v in STATE.items()}, full)
  elif suffix == ".npz":
    np.savez(full, **STATE)
  else:
    from safetensors.numpy import save_file
    save_file(STATE, str(full))
  partial = tmp_path / f"partial{suffix}"
  partial.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
  with pytest.raises(CheckpointError, match=f"partial{suffix} is unreadable or corrupt"):
    load_state_dict(partial)


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_state_dict(tmp_path / "nothing.npz")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="unknown format '.h5'"):
    load_state_dict(tmp_path / "w.h5")


def test_training_checkpoint_wrappers_and_prefixes():
  w = STATE["encoder.w"]
  # The official trainer saves DDP weights under 'state_dict' and 'ema_state_dict' (None without EMA).
  ckpt = {"state_dict": {"module.encoder.w": w}, "ema_state_dict": None, "epoch": 3}
  assert list(strip_prefix(unwrap(ckpt, "f"))) == ["encoder.w"]
  ckpt["ema_state_dict"] = {"module.module.encoder.w": w + 1}
  np.testing.assert_array_equal(strip_prefix(unwrap(ckpt, "f"))["encoder.w"], w + 1)
  np.testing.assert_array_equal(
      strip_prefix(unwrap(ckpt, "f", wrapper_key="state_dict"))["encoder.w"], w)
  with pytest.raises(CheckpointError, match="no state dict under 'model'"):
    unwrap(ckpt, "f", wrapper_key="model")
  with pytest.raises(CheckpointError, match="holds no state dict of arrays"):
    unwrap({"epoch": 3, "optimizer": {"lr": 1.0}}, "f")
  # A prefix only some keys have is part of the names.
  assert sorted(strip_prefix({"module.a": w, "b": w})) == ["b", "module.a"]


def test_torch_file(tmp_path):
  if importlib.util.find_spec("torch") is None:
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(ImportError, match="needs PyTorch"):
      load_state_dict(tmp_path / "w.pt")
    return
  import torch
  tensors = {k: torch.from_numpy(v) for k, v in STATE.items()}
  tensors["half"] = torch.ones(2, dtype=torch.bfloat16) / 3
  torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "w.pt")
  loaded = load_state_dict(tmp_path / "w.pt")
  assert_same({k: loaded[k] for k in STATE}, STATE)
  assert loaded["half"].dtype == np.float32  # bfloat16 widened exactly
  np.testing.assert_array_equal(loaded["half"], tensors["half"].float().numpy())
