"""Training metrics: TensorBoard event files, a JSONL log, reconstruction grid PNGs.

Only process 0 writes; every other process gets a writer that does nothing.
"""

import json
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
from PIL import Image


class MetricsWriter:
  """Writes scalars to `<workdir>/tensorboard` (tensorboardX) and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = pathlib.Path(workdir)
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(inputs, outputs, *, columns: int = 4) -> np.ndarray:
  """Pairs (original | reconstruction) tiled `columns` pairs per row: [rows*H, columns*2*W, 3] uint8."""
  inputs, outputs = to_uint8(inputs), to_uint8(outputs)
  if inputs.shape != outputs.shape or inputs.ndim != 4:
    raise ValueError(f"grid needs two [B, H, W, 3] batches of one shape, got {inputs.shape} and "
                     f"{outputs.shape}")
  b, h, w, c = inputs.shape
  columns = min(columns, b)
  rows = -(-b // columns)
  grid = np.full((rows * h, columns * 2 * w, c), 255, np.uint8)
  for i in range(b):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, 2 * col * w:(2 * col + 1) * w] = inputs[i]
    grid[r * h:(r + 1) * h, (2 * col + 1) * w:(2 * col + 2) * w] = outputs[i]
  return grid


def save_grid(path: str | pathlib.Path, inputs, outputs, *, columns: int = 4) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image_grid(inputs, outputs, columns=columns)).save(path)
  return path
