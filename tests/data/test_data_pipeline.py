"""bitgen.data: the embedded photos TFDS dataset and the grain pipelines over it.

The dataset is built once per session into a temporary data dir, with sockets disabled.
"""

import io
import os
import pathlib
import socket
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from bitgen import data
from bitgen.data import embedded_photos
from bitgen.data import transforms

SIZE = 16


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("tfds")

  def no_network(*args, **kwargs):
    raise AssertionError(f"the embedded photos build opened a network connection: {args}")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", no_network)
    patch.setattr(socket, "create_connection", no_network)
    embedded_photos.prepare(root)
  return root


def _config(data_dir, **overrides):
  return {"name": "embedded_photos", "image_size": SIZE, "data_dir": os.fspath(data_dir), **overrides}


def _batches(config, count, *, seed=0, batch_size=8, **kwargs):
  iterator = iter(data.make_pipeline(config, split="train", batch_size=batch_size, seed=seed, **kwargs))
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _rows(batches):
  """Each example of `batches` as (label, image bytes): a sortable identity."""
  return sorted((int(label), image.tobytes())
                for batch in batches for label, image in zip(batch["label"], batch["image"]))


# --- the TFDS dataset ------------------------------------------------------------------------

def test_build_writes_array_record_and_is_reused(data_dir):
  version_dir = data_dir / "embedded_photos" / str(embedded_photos.EmbeddedPhotos.VERSION)
  records = sorted(version_dir.glob("embedded_photos-*.array_record-*"))
  assert {path.name.split(".")[0] for path in records} == {"embedded_photos-train", "embedded_photos-test"}
  stamps = {path: path.stat().st_mtime_ns for path in records}
  builder = embedded_photos.prepare(data_dir)  # second call: nothing rewritten
  assert builder.is_prepared()
  assert {path: path.stat().st_mtime_ns for path in records} == stamps


def test_photos_are_stored_losslessly_and_split_by_photo(data_dir):
  sources = tfds.data_source("embedded_photos", data_dir=os.fspath(data_dir))  # by name, random access
  names = {}
  for split, source in sources.items():
    names[split] = set()
    for i in range(len(source)):
      record = source[i]
      name = record["name"].decode()
      names[split].add(name)
      assert record["label"] == embedded_photos.PHOTO_NAMES.index(name)
      np.testing.assert_array_equal(record["image"], embedded_photos.load_photo(name), err_msg=name)
  assert names == {"train": set(embedded_photos.TRAIN_PHOTOS), "test": set(embedded_photos.HELD_OUT)}
  assert not names["train"] & names["test"]
  assert len(embedded_photos.HELD_OUT) >= 2


def test_num_classes_counts_every_photo(data_dir):
  assert data.num_classes(_config(data_dir)) == len(embedded_photos.PHOTO_NAMES)


# --- batches -----------------------------------------------------------------------------------

def test_train_batches_shape_range_dtype_and_labels(data_dir):
  train_labels = {embedded_photos.PHOTO_NAMES.index(n) for n in embedded_photos.TRAIN_PHOTOS}
  for batch in _batches(_config(data_dir), 3):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["label"].tolist()) <= train_labels


def test_eval_batches_cover_the_held_out_grid_once(data_dir):
  config = _config(data_dir, eval_grid=3)
  batches = list(data.make_pipeline(config, split="eval", batch_size=4, seed=0))
  expected = data.eval_images(config)
  count = len(embedded_photos.HELD_OUT) * 9
  assert expected["image"].shape == (count, SIZE, SIZE, 3) and len(expected["name"]) == count
  assert set(expected["name"]) == set(embedded_photos.HELD_OUT)
  assert len(batches) == -(-count // 4)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.dtype == bool and mask.sum() == count and not mask[count:].any()
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:count], expected["image"])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:count], expected["label"])


def test_short_side_resizes_before_cropping(data_dir):
  # With the photos shrunk to exactly one crop high, every crop spans the whole photo height.
  config = _config(data_dir, short_side=SIZE, eval_grid=2)
  crops = data.eval_images(config)["image"]
  assert crops.shape == (len(embedded_photos.HELD_OUT) * 4, SIZE, SIZE, 3)
  # Grid rows coincide when the photo is one crop high: crops 0 and 2 (left column) are equal.
  np.testing.assert_array_equal(crops[0], crops[2])
  assert not np.array_equal(crops[0], crops[1])


def _windows_at_short_side(side):
  """Every SIZE-wide full-height window (and its mirror) of the training photos resized to `side` ==
  SIZE: the only crops a scale of SIZE can give (the training photos are landscape or square)."""
  windows = set()
  for name in embedded_photos.TRAIN_PHOTOS:
    photo = transforms.to_model_range(transforms.resize_short_side(embedded_photos.load_photo(name), side))
    assert photo.shape[0] == side
    for left in range(photo.shape[1] - SIZE + 1):
      window = photo[:, left:left + SIZE]
      windows |= {window.tobytes(), window[:, ::-1].tobytes()}
  return windows


def test_train_short_sides_draw_a_scale_per_example(data_dir):
  small = _windows_at_short_side(SIZE)
  only_small = np.concatenate([b["image"] for b in _batches(_config(data_dir, train_short_sides=[SIZE]), 2)])
  assert all(crop.tobytes() in small for crop in only_small)
  mixed = np.concatenate([b["image"] for b in _batches(
      _config(data_dir, train_short_sides=[SIZE, 8 * SIZE]), 4)])
  from_small = sum(crop.tobytes() in small for crop in mixed)
  assert 0 < from_small < len(mixed)


# --- determinism, sharding, state ----------------------------------------------------------------

def test_same_seed_same_batches_whatever_the_threads(data_dir):
  reference = _batches(_config(data_dir, read_threads=1), 3, seed=7)
  _assert_same_batches(reference, _batches(_config(data_dir, read_threads=4), 3, seed=7))
  other = _batches(_config(data_dir), 3, seed=8)
  assert not np.array_equal(reference[0]["image"], other[0]["image"])


def test_process_shards_are_disjoint_and_form_the_global_batch(data_dir):
  config = _config(data_dir)
  steps = 3
  whole = _batches(config, steps, batch_size=8, process_index=0, process_count=1)
  shards = [_batches(config, steps, batch_size=8, process_index=p, process_count=2) for p in range(2)]
  for step in range(steps):
    parts = [shard[step] for shard in shards]
    assert all(part["image"].shape[0] == 4 for part in parts)
    assert not set(_rows(parts[:1])) & set(_rows(parts[1:]))
    assert _rows(parts) == _rows([whole[step]])


def test_eval_shards_cover_the_eval_set(data_dir):
  config = _config(data_dir)
  shards = [list(data.make_pipeline(config, split="eval", batch_size=6, seed=0,
                                    process_index=p, process_count=3)) for p in range(3)]
  assert len({len(shard) for shard in shards}) == 1  # same number of batches everywhere
  real = [{"image": b["image"][b["mask"]], "label": b["label"][b["mask"]]} for s in shards for b in s]
  expected = data.eval_images(config)
  assert _rows(real) == _rows([expected])


def test_iterator_state_restores_the_stream(data_dir):
  config = _config(data_dir)
  iterator = iter(data.make_pipeline(config, split="train", batch_size=4, seed=3))
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  straight = [next(iterator) for _ in range(3)]
  fresh = iter(data.make_pipeline(config, split="train", batch_size=4, seed=3))
  fresh.set_state(state)
  _assert_same_batches(straight, [next(fresh) for _ in range(3)])


def test_iterator_state_through_orbax(data_dir, tmp_path):
  config = _config(data_dir)
  iterator = iter(data.make_pipeline(config, split="train", batch_size=4, seed=3))
  for _ in range(4):
    next(iterator)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  straight = [next(iterator) for _ in range(2)]
  fresh = iter(data.make_pipeline(config, split="train", batch_size=4, seed=3))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same_batches(straight, [next(fresh) for _ in range(2)])


# --- configs and bad input -----------------------------------------------------------------------

def test_get_config_has_every_key_and_is_accepted(data_dir):
  config = data.get_config("embedded_photos", SIZE)
  assert isinstance(config, ml_collections.ConfigDict)
  config.data_dir = os.fspath(data_dir)
  config.eval_grid = 2
  assert data.parse_config(config) == data.DataConfig(
      name="embedded_photos", image_size=SIZE, data_dir=os.fspath(data_dir), eval_grid=2)


def test_unknown_config_key_is_named(data_dir):
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['crop_size'\]"):
    data.make_pipeline(_config(data_dir, crop_size=3), split="train", batch_size=4, seed=0)


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 0}, "data.image_size must be a positive int"),
    ({"short_side": SIZE // 2}, "data.short_side=8 is smaller than data.image_size=16"),
    ({"eval_split": "validation"}, "has no split 'validation'"),
    ({"train_short_sides": [SIZE, SIZE // 2]}, r"data.train_short_sides must be a non-empty list of ints >= "),
    ({"train_short_sides": []}, r"data.train_short_sides must be a non-empty list"),
])
def test_bad_config_values(data_dir, overrides, message):
  with pytest.raises(ValueError, match=message):
    data.make_pipeline(_config(data_dir, **overrides), split="eval", batch_size=4, seed=0)


def test_bad_split_batch_or_process(data_dir):
  config = _config(data_dir)
  with pytest.raises(ValueError, match="split must be one of"):
    data.make_pipeline(config, split="validation", batch_size=4, seed=0)
  with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of process_count=4"):
    data.make_pipeline(config, split="train", batch_size=6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, process_count=2\)"):
    data.make_pipeline(config, split="train", batch_size=4, seed=0, process_index=2, process_count=2)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError,
                     match=f"tfds build cifar10 --data_dir {tmp_path} --file_format array_record"):
    data.make_pipeline({"name": "cifar10", "image_size": 32, "data_dir": os.fspath(tmp_path)},
                       split="train", batch_size=4, seed=0)
  with pytest.raises(data.DatasetNotPreparedError, match="downloads/manual"):
    data.num_classes({"name": "imagenet2012", "image_size": 64, "data_dir": os.fspath(tmp_path)})


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'no_such_photos'"):
    data.num_classes({"name": "no_such_photos", "image_size": 32, "data_dir": os.fspath(tmp_path)})


@pytest.mark.slow
def test_concurrent_builds_share_one_dataset(tmp_path):
  """Two processes of one host preparing the same data dir at once: one builds, the other reuses."""
  code = ("import sys; from bitgen.data import embedded_photos; "
          "print(embedded_photos.prepare(sys.argv[1]).info.splits['train'].num_examples)")
  procs = [subprocess.Popen([sys.executable, "-c", code, os.fspath(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-2000:]
    assert out.split()[-1] == str(len(embedded_photos.TRAIN_PHOTOS))
  assert len(list((tmp_path / "embedded_photos").glob("*/embedded_photos-train.array_record-*"))) == 1


# --- a standard TFDS dataset by name ---------------------------------------------------------------

class BitgenTestGrayImages(tfds.core.GeneratorBasedBuilder):
  """A small labelled grayscale TFDS dataset with a validation split, images of varied sizes."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # see EmbeddedPhotos.code_path

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 1)),
        "label": tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 6), "validation": self._generate_examples(6, 3)}

  def _generate_examples(self, start, count):
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
      image = rng.integers(0, 256, (20 + 3 * i, 40 - 2 * i), dtype=np.uint8)
      buffer = io.BytesIO()
      PIL.Image.fromarray(image).save(buffer, format="png")
      yield i, {"image": buffer.getvalue(), "label": i % 5}


def test_standard_tfds_dataset_by_name(tmp_path):
  BitgenTestGrayImages(data_dir=os.fspath(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  config = {"name": "bitgen_test_gray_images", "image_size": 12, "data_dir": os.fspath(tmp_path)}
  assert data.num_classes(config) == 5
  train = _batches(config, 2, batch_size=4)[0]
  assert train["image"].shape == (4, 12, 12, 3) and train["image"].dtype == np.float32
  np.testing.assert_array_equal(train["image"][..., 0], train["image"][..., 2])  # gray -> RGB
  # Evaluation defaults to the validation split: each image resized to a 12 px short side, centre crop.
  grid = data.eval_images(config)
  source = tfds.data_source("bitgen_test_gray_images", split="validation", data_dir=os.fspath(tmp_path))
  assert grid["image"].shape == (len(source), 12, 12, 3)
  for i in range(len(source)):
    gray = transforms.resize_short_side(np.repeat(source[i]["image"], 3, axis=-1), 12)
    np.testing.assert_array_equal(grid["image"][i], transforms.to_model_range(transforms.center_crop(gray, 12)))
    assert grid["label"][i] == source[i]["label"]
