"""The CLI end to end on a shrunken BSQ-ViT: main (train + eval), eval from a checkpoint, errors."""

import json
import pathlib
import sys

import pytest

from bitgen import cli

sys.path.insert(0, str(pathlib.Path(__file__).parent / "train"))
import fixtures  # pylint: disable=wrong-import-position

CONFIG = """
from configs import bsq_vit

def get_config(arg=""):
  config = bsq_vit.get_config("main")
  config.model.update(image_size=16, patch_size=4, width=32, depth=1, heads=2, decoder_ffn_dim=64)
  config.data.update(image_size=16, data_dir={data_dir!r})
  config.train.update(batch_size=8, steps=2, warmup_steps=1)
  config.checkpoint.every = 2
  config.log.update(every=1, grid_every=2, progress=False)
  config.mesh.shape, config.mesh.devices = (1, 1, 1), 1
  return config
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("config") / "shrunk.py"
  path.write_text(CONFIG.format(data_dir=fixtures.photos_dir()))
  return str(path)


def test_main_trains_evaluates_and_eval_restores(config_file, tmp_path, capsys):
  workdir = tmp_path / "run"
  cli.main(["main", "--config", config_file, "--workdir", str(workdir)])
  out = capsys.readouterr().out
  assert "held-out PSNR" in out and "baseline PSNR" in out
  report = json.loads((workdir / "eval.json").read_text())
  assert report["bits_per_token"] == 18 and report["tokens_per_image"] == 16
  assert len(report["per_bit_entropy"]) == 18
  assert all(0 <= h <= 1 for h in report["per_bit_entropy"])
  assert 0 < report["code_usage"] <= 1
  assert report["num_images"] > 0
  assert (workdir / "metrics.jsonl").exists() and list((workdir / "grids").glob("*.png"))

  (workdir / "eval.json").unlink()
  cli.main(["eval", "--config", config_file, "--workdir", str(workdir)])
  again = json.loads((workdir / "eval.json").read_text())
  assert again["psnr"] == pytest.approx(report["psnr"], abs=1e-4)


def test_eval_without_checkpoint_says_so(config_file, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    cli.main(["eval", "--config", config_file, "--workdir", str(tmp_path / "empty")])


def test_unknown_override_and_benchmark_are_named(config_file, tmp_path):
  with pytest.raises(ValueError, match="unknown config key 'train.stepz'"):
    cli.main(["train", "--config", config_file, "--workdir", str(tmp_path), "--set", "train.stepz=3"])
  with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
    cli.main(["bench", "nope"])


def test_compare_trains_each_quantizer_at_equal_bits(config_file, tmp_path, capsys):
  cli.main(["compare", "--config", config_file, "--workdir", str(tmp_path), "--quantizers",
            "lfq,fsq", "--set", "train.steps=2", "--set", "log.grid_every=0"])
  table = capsys.readouterr().out
  assert "| lfq | 18 |" in table and "| fsq | 18 |" in table
  rows = json.loads((tmp_path / "compare.json").read_text())
  assert [r["quantizer"] for r in rows] == ["lfq", "fsq"]
  assert all(r["bits_per_token"] == 18 for r in rows)
  assert (tmp_path / "lfq" / "checkpoints").is_dir() and (tmp_path / "fsq" / "checkpoints").is_dir()


def test_compare_variant_swaps_only_the_quantizer():
  from bitgen import configlib
  from bitgen.eval import compare
  base = configlib.load_config("bsq_vit:main")
  fsq = compare.variant(base, "fsq")
  assert dict(fsq.model.quantizer) == {"name": "fsq", "num_bits": 18}
  assert fsq.model.l2_normalize is False and base.model.l2_normalize is True
  assert fsq.model.width == base.model.width and fsq.train == base.train
  assert compare.variant(base, "bsq").model.quantizer == base.model.quantizer
