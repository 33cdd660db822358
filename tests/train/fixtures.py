"""Shared pieces of the trainer tests: a tiny config and a checkpointable grain data iterator."""

import grain
import numpy as np
from flax import nnx

from bitgen.train.tokenizer import TokenizerTask
from stand_in import StandIn

IMAGE = 16


def images(count: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (count, IMAGE, IMAGE, 3)).astype(np.float32)


def grain_batches(batch_size: int, seed: int = 0, count: int = 32):
  """An endless, shuffled, checkpointable iterator of {"image": [B, H, W, 3]} batches."""
  dataset = (grain.MapDataset.source(images(count)).shuffle(seed=seed).repeat()
             .batch(batch_size).map(lambda x: {"image": x}))
  return iter(dataset.to_iter_dataset())


def task(bits: int = 8, **loss) -> TokenizerTask:
  return TokenizerTask(model_fn=lambda rngs: StandIn(rngs, bits=bits), loss=loss or None)


def config(steps: int, *, mesh=(1, -1, 1), devices: int | None = 1, every: int = 2,
           batch_size: int = 8, **train):
  return {
      "train": {"batch_size": batch_size, "steps": steps, "lr": 1e-3, "warmup_steps": 1,
                "decay_steps": 20, **train},
      "mesh": {"shape": mesh, "devices": devices},
      "checkpoint": {"every": every, "keep": 2},
      "log": {"every": 1, "grid_every": 2, "progress": False},
  }
