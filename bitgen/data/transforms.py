"""Numpy image transforms of the input pipelines: resize, crops, flips, and the [-1, 1] float range.

Images are uint8 [H, W, 3] until `to_model_range`; crops are (top, left) offsets into the image.
"""

import numpy as np
import PIL.Image


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
  """Resizes so that min(H, W) == short_side, keeping the aspect ratio (bicubic, antialiased)."""
  height, width = image.shape[:2]
  if min(height, width) == short_side:
    return image
  scale = short_side / min(height, width)
  size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))  # PIL: (W, H)
  return np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.BICUBIC))


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
  return image[top:top + size, left:left + size]


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly placed size x size crop, mirrored left-right with probability 1/2."""
  height, width = image.shape[:2]
  if min(height, width) < size:
    raise ValueError(f"cannot take a {size} px crop from a {height} x {width} image")
  top = int(rng.integers(0, height - size + 1))
  left = int(rng.integers(0, width - size + 1))
  patch = crop(image, top, left, size)
  return patch[:, ::-1] if rng.random() < 0.5 else patch


def grid_offsets(height: int, width: int, size: int, grid: int) -> list[tuple[int, int]]:
  """(top, left) of a grid x grid lattice of size x size crops spread evenly from corner to corner."""
  if min(height, width) < size:
    raise ValueError(f"cannot take a {size} px crop from a {height} x {width} image")
  tops = np.linspace(0, height - size, grid).round().astype(int)
  lefts = np.linspace(0, width - size, grid).round().astype(int)
  return [(int(t), int(l)) for t in tops for l in lefts]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  height, width = image.shape[:2]
  return crop(image, (height - size) // 2, (width - size) // 2, size)


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], bitgen's image range."""
  return image.astype(np.float32) / 127.5 - 1.0
