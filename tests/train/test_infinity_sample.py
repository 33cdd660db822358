"""`bitgen sample` for Infinity: a tiny two-stage run (one step each) -> an RGB PNG grid."""

import numpy as np
import pytest
from PIL import Image

from bitgen import cli
from bitgen.train import infinity as infinity_train
from bitgen.train import trainer

# Compiling the two one-step trainings and the sampler takes minutes on a 2-core CPU.
pytestmark = pytest.mark.slow

CONFIG_FILE = '''
from configs import infinity

def get_config(vae_source):
  config = infinity.get_config("train_tiny")
  vae = dict(codebook_dim=4, base_channels=24, channel_mult=(1, 1), num_res_blocks=1, patch_size=2,
             image_channels=3)
  config.vae = vae
  config.vae_stage.model = vae
  config.vae_stage.data.image_size = 8
  config.vae_stage.train.update(batch_size=8, steps=1, warmup_steps=0)
  config.vae_source = vae_source
  config.model.update(embed_dim=64, depth=1, num_heads=2, num_bits=4, text_channels=128)
  config.data.image_size = 8
  config.train.update(batch_size=8, steps=1, warmup_steps=0)
  config.sample.columns = 2
  for stage in (config, config.vae_stage):
    stage.log.update(grid_every=0, progress=False)
    stage.checkpoint.update(async_save=False)
  return config
'''


def synthetic(batch_size):
  rng = np.random.default_rng(0)
  while True:
    yield {"image": np.tanh(rng.normal(size=(batch_size, 8, 8, 3))).astype(np.float32),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config spec for the CLI, the loaded config, transformer workdir) of a one-step tiny run."""
  from bitgen import configlib
  root = tmp_path_factory.mktemp("infinity_run")
  (root / "tiny_infinity.py").write_text(CONFIG_FILE)
  spec = f"{root / 'tiny_infinity.py'}:{root / 'vae'}"
  config = configlib.load_config(spec)
  trainer.run(config.vae_stage, root / "vae", task=infinity_train.build_task(config.vae_stage),
              train_data=synthetic(8))
  trainer.run(config, root / "ar", task=infinity_train.build_task(config), train_data=synthetic(8))
  return spec, config, root / "ar"


def test_cli_writes_the_rgb_grid_of_the_samples(trained, tmp_path):
  import jax
  from bitgen.sample import next_scale
  from bitgen.train.metrics import to_uint8
  spec, config, workdir = trained
  out = tmp_path / "grid.png"
  cli.main(["sample", "--config", spec, "--workdir", str(workdir), "--out", str(out), "--num", "3",
            "--seed", "5", "--temperature", "0.7", "--guidance", "2.0"])
  grid = np.asarray(Image.open(out))
  assert Image.open(out).mode == "RGB" and grid.shape == (16, 16, 3)  # 2 rows x 2 columns of 8 px
  assert (grid[8:, 8:] == 255).all()  # the empty fourth cell

  # The grid holds exactly the decoded samples of those labels, channels in RGB order.
  model, task = infinity_train.restore_model(config, workdir)
  schedule, _ = task.schedules((3, 8, 8, 3))
  generation = next_scale.generate(model, schedule, jax.random.key(5), labels=np.array([0, 1, 2]),
                                   cfg=2.0, tau=0.7)
  images = to_uint8(task.vae.decode(generation.latent))
  np.testing.assert_array_equal(grid[:8, :8], images[0])
  np.testing.assert_array_equal(grid[:8, 8:], images[1])
  np.testing.assert_array_equal(grid[8:, :8], images[2])
  again = tmp_path / "again.png"
  cli.main(["sample", "--config", spec, "--workdir", str(workdir), "--out", str(again), "--num", "3",
            "--seed", "5", "--temperature", "0.7", "--guidance", "2.0"])
  np.testing.assert_array_equal(np.asarray(Image.open(again)), grid)


def test_sample_rejects_steps_and_wrong_workdirs(trained, tmp_path):
  spec, config, workdir = trained
  out = str(tmp_path / "x.png")
  with pytest.raises(ValueError, match="steps=4 does not apply"):
    cli.main(["sample", "--config", spec, "--workdir", str(workdir), "--out", out, "--steps", "4"])
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    cli.main(["sample", "--config", spec, "--workdir", str(tmp_path / "empty"), "--out", out])
  with pytest.raises(ValueError, match="num_images must be >= 1"):
    infinity_train.sample_grid_from_config(config, workdir, out, num_images=0)


def test_cli_eval_reports_held_out_bits_per_bit(trained):
  import json
  spec, config, workdir = trained
  cli.main(["eval", "--config", spec, "--workdir", str(workdir)])
  report = json.loads((workdir / "eval.json").read_text())
  held_out = report["held_out"]
  assert held_out["crops"] > 0 and held_out["photos"]
  # One training step: the model is near chance (1 bit per bit), the fitted baseline below it.
  assert 0 < held_out["baseline_bits_per_bit"] < 1.5
  assert 0.5 < held_out["bits_per_bit_unconditional"] < 2.0
