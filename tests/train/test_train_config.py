"""The training config layout: defaults, and one clear error per bad key or value."""

import pytest

from bitgen.train import config as config_lib
from bitgen.train import run


def test_defaults_fill_every_section():
  config = config_lib.with_defaults({"train": {"steps": 5}})
  assert config.train.steps == 5 and config.train.b2 == 0.99 and config.train.ema_decay == 0.999
  assert config.mesh.axis_types == "explicit" and config.checkpoint.every == 1000
  assert config.log.grid_every == 500 and config.task == "tokenizer"


@pytest.mark.parametrize("config, match", [
    ({"train": {"stesp": 5}}, r"unknown key\(s\) \['stesp'\] in config.train"),
    ({"checkpoint": {"every_steps": 5}}, r"in config.checkpoint"),
    ({"train": {"batch_size": 0}}, "must be positive"),
])
def test_bad_config_keys(config, match):
  with pytest.raises(ValueError, match=match):
    config_lib.with_defaults(config)


def test_run_rejects_batch_not_divisible_by_mesh(tmp_path):
  config = {"train": {"batch_size": 6, "steps": 1}, "mesh": {"shape": (2, 2, 2)}}
  with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 batch shards"):
    run(config, tmp_path)


def test_run_rejects_unknown_task(tmp_path):
  with pytest.raises(ValueError, match="unknown task 'diffusion'"):
    run({"task": "diffusion", "train": {"steps": 1}}, tmp_path)
