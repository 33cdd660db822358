import dataclasses

import ml_collections
import pytest

from bitgen import configlib


@dataclasses.dataclass(frozen=True)
class Toy:
  width: int
  depth: int = 2


def test_from_dict_builds_and_names_bad_keys():
  assert configlib.from_dict(Toy, {"width": 3}) == Toy(3, 2)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['widht'\].*valid keys: \['depth', 'width'\]"):
    configlib.from_dict(Toy, {"widht": 3})
  with pytest.raises(ValueError, match=r"missing key\(s\) \['width'\]"):
    configlib.from_dict(Toy, {"depth": 3})


def write_config(tmp_path):
  path = tmp_path / "toy.py"
  path.write_text(
      "import ml_collections\n"
      "def get_config(arg='base'):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.variant = arg\n"
      "  c.train = ml_collections.ConfigDict({'steps': 10, 'lr': 1e-3, 'name': 'x'})\n"
      "  return c\n")
  return path


def test_load_config_file_with_arg_and_overrides(tmp_path):
  path = write_config(tmp_path)
  config = configlib.load_config(f"{path}:tiny", ["train.steps=20", "train.lr=0.5", "train.name=y"])
  assert config.variant == "tiny"
  assert (config.train.steps, config.train.lr, config.train.name) == (20, 0.5, "y")
  assert configlib.load_config(str(path)).variant == "base"


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("train.steps", "must look like key=value"),
])
def test_bad_overrides_are_named(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    configlib.load_config(str(write_config(tmp_path)), [override])


def test_missing_config_is_named(tmp_path):
  with pytest.raises(ValueError, match="unknown config 'nope'"):
    configlib.load_config("nope:tiny")
  with pytest.raises(FileNotFoundError, match="missing.py"):
    configlib.load_config(str(tmp_path / "missing.py"))
