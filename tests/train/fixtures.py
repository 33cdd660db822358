"""Shared pieces of the trainer tests: a shrunken BSQ-ViT, the embedded photos, a tiny config."""

import functools
import os
import tempfile

import numpy as np

from configs import bsq_vit
from bitgen.train.tokenizer import TokenizerTask

IMAGE = 16


def model_config(bits: int = 18, group_size: int = 9):
  """configs/bsq_vit.py "tiny", shrunk to 16x16 images, patch 4, width 32, one block."""
  model = bsq_vit.get_config("tiny").model
  model.update(image_size=IMAGE, patch_size=4, width=32, depth=1, heads=2, decoder_ffn_dim=64)
  model.quantizer.update(num_bits=bits, group_size=group_size)
  return model


@functools.cache
def photos_dir() -> str:
  """A data dir with the embedded photos dataset, built once per test process (or given by the
  parent process in $BITGEN_TEST_PHOTOS_DIR, so that subprocesses do not build it concurrently)."""
  from bitgen import data  # pylint: disable=g-import-not-at-top
  if os.environ.get("BITGEN_TEST_PHOTOS_DIR"):
    return os.environ["BITGEN_TEST_PHOTOS_DIR"]
  directory = tempfile.mkdtemp(prefix="bitgen-train-photos-")
  next(iter(data.make_pipeline(data_config(directory), split="train", batch_size=1, seed=0)))
  return directory


def data_config(directory: str) -> dict:
  return {"name": "embedded_photos", "image_size": IMAGE, "data_dir": directory,
          "read_threads": 1}


def images(count: int = 8, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (count, IMAGE, IMAGE, 3)).astype(np.float32)


def task(bits: int = 18, group_size: int = 9, **loss) -> TokenizerTask:
  return TokenizerTask(model_config(bits, group_size), loss=loss or None)


def config(steps: int, *, mesh=(1, -1, 1), devices: int | None = 1, every: int = 2,
           batch_size: int = 8, **train):
  """A full training config: the shrunken BSQ-ViT on the embedded photos."""
  return {
      "model": model_config(),
      "data": data_config(photos_dir()),
      "train": {"batch_size": batch_size, "steps": steps, "lr": 1e-3, "warmup_steps": 1,
                "decay_steps": 20, "seed": 0, **train},
      "mesh": {"shape": mesh, "devices": devices},
      "checkpoint": {"every": every, "keep": 2},
      "log": {"every": 1, "grid_every": 2, "progress": False},
  }
