"""grain input pipelines: endless random crops for training, a fixed set of crops for evaluation.

    ds = make_pipeline(config, split="train", batch_size=64, seed=0)   # a grain.IterDataset
    it = iter(ds)                                                     # a grain.DatasetIterator
    batch = next(it)  # {"image": float32 [b, S, S, 3] in [-1, 1], "label": int32 [b]}, b = 64 / processes

Determinism: element g of the global training stream depends only on (seed, g) — which image (a
per-epoch permutation of images x `crops_per_image` slots) and where the crop and flip fall — so
global batch s is elements [s * B, (s + 1) * B) whatever the thread count or restarts. Process p of P
takes elements g = p (mod P), so the processes' batches are disjoint and together form the global batch.

Checkpointing the iterator (what the trainer passes to Orbax):
    it.get_state() / it.set_state(state)        # a small JSON-able dict ({"next_index": ...})
    ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))       # save
    ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it))    # restore into a fresh `it`
grain's handler writes one `process_<i>-of-<n>.json` per jax process. Restore into an iterator of a
pipeline made with the same config, seed, batch size and process count.

Evaluation batches add `"mask"` (bool [b]): the crops are padded up to a whole number of global
batches with copies marked False, so every process sees the same number of equal-shape batches.
"""

import dataclasses
import functools
import math
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from bitgen import configlib
from bitgen.data import embedded_photos
from bitgen.data import sources
from bitgen.data import transforms

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` part of a training config. None means: the dataset's default, as noted."""
  name: str  # "embedded_photos" or a TFDS name ("cifar10", "imagenet2012", "name/config:version")
  image_size: int  # side of the square crops fed to the model
  data_dir: str | None = None  # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  short_side: int | None = None  # resize images to this short side before cropping; None: embedded
  #   photos keep their resolution (upsampled only where smaller than a crop), others use image_size
  train_short_sides: tuple[int, ...] | None = None  # scale augmentation: each training crop comes
  #   from its image resized to one of these short sides, drawn per example; None: short_side
  crops_per_image: int | None = None  # training slots per image per epoch; None: 256 embedded, else 1
  eval_grid: int | None = None  # eval crops per image = eval_grid ** 2 on a corner-to-corner grid
  #   (1 = centre crop); None: 4 for the embedded photos, else 1
  train_split: str = "train"
  eval_split: str | None = None  # None: embedded "test"; else "validation" if present, else "test"
  read_threads: int = 4  # grain threads decoding and cropping
  prefetch_batches: int = 2  # per-process batches read ahead

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"data.name must be a dataset name, got {self.name!r}")
    for key in ("image_size", "short_side", "crops_per_image", "eval_grid", "read_threads",
                "prefetch_batches"):
      value = getattr(self, key)
      optional = key in ("short_side", "crops_per_image", "eval_grid")
      if not (optional and value is None) and (not isinstance(value, int) or value < 1):
        raise ValueError(f"data.{key} must be a positive int, got {value!r}")
    if self.short_side is not None and self.short_side < self.image_size:
      raise ValueError(f"data.short_side={self.short_side} is smaller than data.image_size={self.image_size}")
    if self.train_short_sides is not None:
      sides = self.train_short_sides
      if (isinstance(sides, (str, bytes)) or not hasattr(sides, "__iter__") or not len(sides)
          or not all(isinstance(side, int) and side >= self.image_size for side in sides)):
        raise ValueError(f"data.train_short_sides must be a non-empty list of ints >= data.image_size="
                         f"{self.image_size}, got {sides!r}")
      object.__setattr__(self, "train_short_sides", tuple(sides))

  @property
  def is_embedded(self) -> bool:
    return self.name == embedded_photos.NAME


def get_config(name: str = embedded_photos.NAME, image_size: int = 64) -> ml_collections.ConfigDict:
  """Every `DataConfig` key at its default, so that `key=value` overrides can reach each one."""
  return ml_collections.ConfigDict(dataclasses.asdict(DataConfig(name=name, image_size=image_size)))


def parse_config(config: Any) -> DataConfig:
  if isinstance(config, DataConfig):
    return config
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return configlib.from_dict(DataConfig, config, where="data config")


def _open(config: DataConfig, split: str, short_side: int | None = None) -> sources.ImageSplit:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  tfds_split = config.train_split if split == "train" else (
      config.eval_split or sources.default_eval_split(config.name, config.data_dir))
  short_side = short_side or config.short_side or (None if config.is_embedded else config.image_size)
  return sources.open_split(config.name, tfds_split, data_dir=config.data_dir,
                            crop_size=config.image_size, short_side=short_side)


def _eval_grid(config: DataConfig) -> int:
  return config.eval_grid or (4 if config.is_embedded else 1)


def _crops_per_image(config: DataConfig) -> int:
  return config.crops_per_image or (256 if config.is_embedded else 1)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  return np.random.default_rng((seed, 0, epoch)).permutation(size)


def _train_example(index: int, *, scales: tuple[sources.ImageSplit, ...], slots: int, seed: int,
                   size: int) -> dict[str, np.ndarray]:
  """Element `index` of the endless training stream: a function of (seed, index) only.

  `scales`: the training split at each of `train_short_sides` (one entry without augmentation).
  """
  epoch, position = divmod(index, slots)
  slot = int(_epoch_permutation(seed, epoch, slots)[position])
  images = scales[int(np.random.default_rng((seed, 2, index)).integers(len(scales)))]
  image, label, _ = images[slot % len(images)]
  patch = transforms.random_crop_flip(image, size, np.random.default_rng((seed, 1, index)))
  return {"image": transforms.to_model_range(patch), "label": np.int32(label)}


def _eval_crop(index: int, *, images: sources.ImageSplit, grid: int,
               size: int) -> tuple[np.ndarray, int, str]:
  image, label, name = images[index // grid**2]
  if grid == 1:
    return transforms.center_crop(image, size), label, name
  top, left = transforms.grid_offsets(*image.shape[:2], size, grid)[index % grid**2]
  return transforms.crop(image, top, left, size), label, name


def _eval_example(index: int, *, count: int, **kwargs) -> dict[str, np.ndarray]:
  """Element `index` of the padded evaluation set: crop `index`, or a masked copy past the end."""
  patch, label, _ = _eval_crop(index % count, **kwargs)
  return {"image": transforms.to_model_range(patch), "label": np.int32(label),
          "mask": np.bool_(index < count)}


def _process_layout(batch_size: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
        f"global batch_size={batch_size} must be a positive multiple of process_count={process_count}")
  return process_index, process_count, batch_size // process_count


def make_pipeline(config: Any, *, split: str, batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """This process's share of the `split` ("train" or "eval") batches; see the module docstring.

  `config`: a `DataConfig` or a dict / ConfigDict of its keys. `batch_size` is global; each process
  gets batch_size / process_count examples per batch. Training is endless; evaluation is one pass.
  """
  config = parse_config(config)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  process_index, process_count, local_batch = _process_layout(batch_size, process_index, process_count)
  if split == "train":
    scales = tuple(_open(config, split, side) for side in config.train_short_sides or (None,))
    slots = len(scales[0]) * _crops_per_image(config)
    stream = grain.MapDataset.range(sys.maxsize).map(functools.partial(
        _train_example, scales=scales, slots=slots, seed=int(seed), size=config.image_size))
  else:
    images = _open(config, split)
    count = len(images) * _eval_grid(config) ** 2
    stream = grain.MapDataset.range(math.ceil(count / batch_size) * batch_size).map(functools.partial(
        _eval_example, count=count, images=images, grid=_eval_grid(config), size=config.image_size))
  # Element g of the stream at position g // process_count of process g % process_count.
  stream = stream[process_index::process_count]
  read_options = grain.ReadOptions(num_threads=config.read_threads,
                                   prefetch_buffer_size=config.prefetch_batches * local_batch)
  return stream.to_iter_dataset(read_options).batch(local_batch, drop_remainder=True)


def eval_images(config: Any, *, max_images: int | None = None) -> dict[str, Any]:
  """The evaluation crops, unpadded and unsharded, for reconstruction grids.

  Returns {"image": float32 [N, S, S, 3] in [-1, 1], "label": int32 [N], "name": N source names},
  the same crops in the same order as the "eval" pipeline, the first `max_images` of them if given.
  """
  config = parse_config(config)
  images = _open(config, "eval")
  grid = _eval_grid(config)
  count = len(images) * grid**2 if max_images is None else min(max_images, len(images) * grid**2)
  crops = [_eval_crop(i, images=images, grid=grid, size=config.image_size) for i in range(count)]
  return {"image": np.stack([transforms.to_model_range(patch) for patch, _, _ in crops]),
          "label": np.array([label for _, label, _ in crops], np.int32),
          "name": [name for _, _, name in crops]}


def num_classes(config: Any) -> int:
  """Classes of the dataset's label (the number of photos for the embedded photos; 1 if unlabelled)."""
  return _open(parse_config(config), "train").num_classes

