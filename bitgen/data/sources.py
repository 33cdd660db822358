"""Random access to the images of one split: the embedded photos, or any prepared TFDS dataset.

A split is an `ImageSplit`: `len(split)` images, `split[i] -> (image uint8 [H, W, 3], label, name)`,
every image already resized so that its short side is at least the crop size. Standard datasets are
read lazily through `tfds` data sources (array_record); the embedded photos are few and are decoded
once and kept in memory.
"""

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from bitgen.data import embedded_photos
from bitgen.data import transforms


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset named in the config has no array_record files under the data dir."""


def _as_rgb(image: np.ndarray, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:  # grayscale datasets (mnist, ...) enter an RGB model as three equal channels
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{where}: expected a uint8 RGB or grayscale image, got {image.dtype} {image.shape}")
  return image


def _fit(image: np.ndarray, short_side: int | None, crop_size: int) -> np.ndarray:
  """Resizes to `short_side` when given; else only upsamples images too small for one crop."""
  target = short_side if short_side is not None else max(crop_size, min(image.shape[:2]))
  return transforms.resize_short_side(image, target)


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """One split of a dataset, indexable. `records` is a tfds data source or a list of dicts."""
  dataset: str
  split: str
  records: Sequence[dict]
  crop_size: int
  short_side: int | None
  num_classes: int

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int, str]:
    record = self.records[index]
    where = f"{self.dataset}/{self.split}[{index}]"
    image = _fit(_as_rgb(record["image"], where), self.short_side, self.crop_size)
    label = int(record["label"]) if "label" in record else 0
    name = record.get("name", record.get("file_name", where))
    return image, label, name.decode() if isinstance(name, bytes) else str(name)


def _prepare_instructions(name: str, data_dir: str) -> str:
  command = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
  text = f"prepare it once with:\n  {command}"
  if name.split(":")[0].split("/")[0] == "imagenet2012":
    text += (f"\nimagenet2012 needs the ILSVRC2012 archives (ILSVRC2012_img_train.tar, "
             f"ILSVRC2012_img_val.tar) downloaded by hand from image-net.org into {data_dir}/downloads/manual "
             f"first (or pass --manual_dir DIR)")
  return text


def _open_tfds(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"unknown dataset {name!r}: neither {embedded_photos.NAME!r} nor a TFDS dataset name") from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared under {data_dir}; {_prepare_instructions(name, data_dir)}")
  file_format = builder.info.file_format
  if file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} under {builder.data_dir} is stored as {file_format.value}, which has no "
        f"random access; {_prepare_instructions(name, data_dir)} (into another --data_dir, or after "
        f"deleting {builder.data_dir})")
  return builder


@functools.lru_cache(maxsize=16)  # a trainer opens the same split for its pipeline, grids and classes
def open_split(name: str, split: str, *, data_dir: str | os.PathLike | None, crop_size: int,
               short_side: int | None) -> ImageSplit:
  """Opens `split` of dataset `name` (building the embedded photos on first use)."""
  root = embedded_photos.resolve_data_dir(data_dir)
  if name == embedded_photos.NAME:
    builder = embedded_photos.prepare(root)
  else:
    builder = _open_tfds(name, os.fspath(root))
  splits = sorted(builder.info.splits.keys())
  if split not in builder.info.splits:
    raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {splits}")
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"dataset {name!r} has no 'image' feature; features: {sorted(features.keys())}")
  labels = features["label"] if "label" in features else None
  num_classes = labels.num_classes if isinstance(labels, tfds.features.ClassLabel) else 1
  image_split = ImageSplit(name, split, builder.as_data_source(split=split), crop_size, short_side,
                           num_classes)
  if not len(image_split):
    raise ValueError(f"split {split!r} of dataset {name!r} under {root} has no examples")
  if name == embedded_photos.NAME:  # a handful of photos: decode once, keep in memory, in label order
    photos = sorted((image_split[i] for i in range(len(image_split))), key=lambda photo: photo[1])
    image_split = dataclasses.replace(image_split, records=[
        {"image": image, "label": label, "name": photo_name} for image, label, photo_name in photos])
  return image_split


def default_eval_split(name: str, data_dir: str | os.PathLike | None) -> str:
  """'test' for the embedded photos; else 'validation' where the dataset has one, else 'test'."""
  if name == embedded_photos.NAME:
    return "test"
  builder = _open_tfds(name, os.fspath(embedded_photos.resolve_data_dir(data_dir)))
  return "validation" if "validation" in builder.info.splits else "test"
