"""`bitgen train` / `bitgen sample` on the two-stage BLD config (configs/bld.py:photos), shrunk to
8^2 crops, a one-block denoiser and 2 training steps per stage; and the bad-input errors."""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from bitgen import cli
from bitgen.train.checkpoint import CheckpointError

sys.path.insert(0, str(pathlib.Path(__file__).parent / "train"))
import fixtures  # pylint: disable=wrong-import-position

TOTAL_STEPS = 8
CONFIG = """
from configs import bld

def get_config(arg=""):
  config = bld.get_config("photos")
  autoencoder = dict(image_size=8, in_channels=3, base_channels=32, channel_mult=(1,),
                     num_res_blocks=1, attn_resolutions=(), emb_dim=32, num_bits=8,
                     decoder_res_mult=1.0, norm_first=True, code_weight=0.0)
  for stage, batch in ((config.ae, 4), (config.prior, 8)):
    stage.data = dict(name="embedded_photos", image_size=8, data_dir={data_dir!r}, eval_grid=1,
                      read_threads=1)
    stage.train.update(steps=2, batch_size=batch, warmup_steps=0)
    stage.autoencoder = dict(autoencoder)
  config.ae.model = dict(autoencoder)
  config.prior.model = dict(num_bits=8, latent_size=8, width=32, heads=2, depth=1, num_classes=10,
                            time_scale_steps={total_steps})
  config.prior.diffusion.total_steps = {total_steps}
  config.prior.sample.steps = 4
  return config
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("bld_cli_config") / "bld_tiny.py"
  path.write_text(CONFIG.format(data_dir=fixtures.photos_dir(), total_steps=TOTAL_STEPS))
  return str(path)


@pytest.fixture(scope="module")
def workdir(config, tmp_path_factory) -> pathlib.Path:
  """A workdir trained by `bitgen train` (both stages, 2 steps each)."""
  workdir = tmp_path_factory.mktemp("bld_cli") / "run"
  cli.main(["train", "--config", config, "--workdir", str(workdir)])
  return workdir


def sample(config: str, workdir: pathlib.Path, out: pathlib.Path, *extra: str) -> np.ndarray:
  cli.main(["sample", "--config", config, "--workdir", str(workdir), "--out", str(out), *extra])
  return np.asarray(Image.open(out))


@pytest.mark.slow
def test_train_both_stages_then_sample_grids(config, workdir, tmp_path):
  report = json.loads((workdir / "report.json").read_text())
  assert report["autoencoder"]["steps"] == 2 and report["prior"]["steps"] == 2
  assert np.isfinite(report["autoencoder"]["psnr"])
  assert report["prior"]["bits_per_image"] == 8 * 8 * 8
  assert all(v > 0 for v in report["prior"]["held_out"]["nll_bound"].values())

  grid = sample(config, workdir, tmp_path / "grid.png", "--steps", "3", "--num", "3")
  assert grid.shape == (8, 3 * 8, 3) and grid.dtype == np.uint8
  assert grid.std() > 0
  # All T steps with equal strides, 10 images in 8 columns: the last 6 cells of row 2 are blank.
  grid = sample(config, workdir, tmp_path / "even.png", "--steps", str(TOTAL_STEPS), "--num", "10",
                "--set", "prior.sample.spacing=even")
  assert grid.shape == (2 * 8, 8 * 8, 3)
  assert np.all(grid[8:, 2 * 8:] == 255) and grid[8:, :2 * 8].std() > 0


# The bad requests below fail before any checkpoint loads: the workdir need not exist.
def test_sample_bad_steps(config, tmp_path):
  workdir = tmp_path / "untrained"
  with pytest.raises(ValueError, match=rf"sampling steps \(9\) exceed the {TOTAL_STEPS} diffusion"):
    sample(config, workdir, tmp_path / "x.png", "--steps", str(TOTAL_STEPS + 1))
  with pytest.raises(ValueError, match="must be >= 1"):
    sample(config, workdir, tmp_path / "x.png", "--steps", "0")
  # Equal strides need (T - 1) % (steps - 1) == 0: 7 % 3 != 0; 7 % 7 == 0 works.
  with pytest.raises(ValueError, match="'even' spacing needs T - 1 = 7 divisible by steps - 1 = 3"):
    sample(config, workdir, tmp_path / "x.png", "--steps", "4", "--set", "prior.sample.spacing=even")
  assert not (tmp_path / "x.png").exists()


def test_bits_mismatch_between_autoencoder_and_prior(config, tmp_path):
  workdir = tmp_path / "untrained"
  with pytest.raises(ValueError, match="bits mismatch: the autoencoder has num_bits=8 per position, "
                                       "the denoiser \\(prior\\) num_bits=16"):
    sample(config, workdir, tmp_path / "x.png", "--set", "prior.model.num_bits=16")
  with pytest.raises(ValueError, match="config_prior.autoencoder differs from config_ae.model "
                                       r"\(prior's vs autoencoder's: num_bits 8 vs 16\)"):
    sample(config, workdir, tmp_path / "x.png", "--set", "ae.model.num_bits=16")
  with pytest.raises(ValueError, match="bits mismatch"):
    cli.main(["train", "--config", config, "--workdir", str(tmp_path / "new"),
              "--set", "prior.model.num_bits=16"])
  assert not (tmp_path / "new").exists()  # checked before anything trains


@pytest.mark.slow
def test_sample_wrong_or_missing_checkpoint(config, workdir, tmp_path):
  # An autoencoder (and its prior's copy of it) of another depth than the one trained here.
  with pytest.raises(CheckpointError, match="written by a different model or configuration"):
    sample(config, workdir, tmp_path / "x.png", "--set", "ae.model.decoder_res_mult=2.0",
           "--set", "prior.autoencoder.decoder_res_mult=2.0")
  # The prior's checkpoints where the autoencoder's belong.
  swapped = tmp_path / "swapped"
  shutil.copytree(workdir / "prior" / "checkpoints", swapped / "ae" / "checkpoints")
  with pytest.raises(CheckpointError, match="written by a different model or configuration"):
    sample(config, swapped, tmp_path / "x.png")
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    sample(config, tmp_path / "empty", tmp_path / "x.png")


def test_sample_needs_a_two_stage_config(tmp_path):
  with pytest.raises(SystemExit, match="config task 'bld_prior' has no sampler"):
    cli.main(["sample", "--config", "bld:photos_prior", "--workdir", str(tmp_path), "--out",
              str(tmp_path / "x.png")])
  from bitgen.train import bld as bld_train
  from configs import bld as bld_configs
  with pytest.raises(ValueError, match="two-stage BLD config"):
    bld_train.sample_grid_from_config(bld_configs.get_config("photos_prior"), tmp_path,
                                      tmp_path / "x.png")


@pytest.mark.slow
def test_eval_restores_both_stages_and_reproduces_the_report(config, workdir):
  """`bitgen eval --ema` re-evaluates the EMA models train_bld reported on: the same numbers."""
  cli.main(["eval", "--config", config, "--workdir", str(workdir), "--ema"])
  report = json.loads((workdir / "report.json").read_text())
  again = json.loads((workdir / "eval.json").read_text())
  assert again["autoencoder"]["psnr"] == pytest.approx(report["autoencoder"]["psnr"], abs=1e-4)
  assert again["prior"]["held_out"]["nll_bound"] == pytest.approx(
      report["prior"]["held_out"]["nll_bound"], abs=1e-4)


def test_eval_without_checkpoint_says_so(config, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*ae.*train first"):
    cli.main(["eval", "--config", config, "--workdir", str(tmp_path / "empty")])
