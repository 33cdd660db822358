"""Executes the Colab notebooks top to bottom with a shrunken config."""

import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "train"))
import fixtures  # pylint: disable=wrong-import-position

COLAB = pathlib.Path(__file__).parents[2] / "colab"


def test_tiny_tokenizer_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  overrides = [
      "model.image_size=16", "model.patch_size=4", "model.width=32", "model.depth=1",
      "model.heads=2", "model.decoder_ffn_dim=64", "data.image_size=16",
      f"data.data_dir={fixtures.photos_dir()}", "train.batch_size=8", "train.warmup_steps=1",
      "checkpoint.every=3", "log.progress=False", "log.grid_every=0"]
  monkeypatch.setenv("BITGEN_NOTEBOOK_STEPS", "3")
  monkeypatch.setenv("BITGEN_NOTEBOOK_OVERRIDES", ";".join(overrides))
  monkeypatch.setenv("BITGEN_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  notebook = nbformat.read(COLAB / "tiny_tokenizer.ipynb", as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
  assert "held-out PSNR" in outputs
  images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the notebook shows no reconstruction grid"
  assert (tmp_path / "run" / "checkpoints").is_dir()
