"""`embedded_photos`: the real RGB photos that scikit-image and scikit-learn ship, as a TFDS dataset.

Built offline (every photo is a file inside the installed packages) into array_record files under
`<data_dir>/embedded_photos/<version>/`, once; later calls reuse them. Train and test are split by
whole photo, so no pixel of a held-out photo is ever seen in training. Each example is one full photo:
`image` uint8 [H, W, 3] (lossless PNG inside the record), `label` = the photo's id (its index in
`PHOTOS`, shared by both splits), and `name`.

Writing needs no TensorFlow: `tfds.features.Image` encodes numpy arrays with `tf.image.encode_png`,
but stores encoded bytes as they are, so the generator yields PNG bytes written by PIL. Reading goes
through `builder.as_data_source()` (random access, decoded with PIL).

Not included: the gray photos (camera, moon, coins, grass, gravel, brick, ...), since an RGB tokenizer
would see a third of its data without colour; the photos scikit-image fetches with pooch (eagle, lily,
skin, kidney, brain, ...), which need the network; the right view of the stereo motorcycle pair (a near
copy of the left one); and the synthetic images (colorwheel, logo, chessboard, phantom).
"""

import fcntl
import io
import os
import pathlib
from collections.abc import Callable

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

NAME = "embedded_photos"


def _skimage(name: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    import skimage.data  # pylint: disable=import-outside-toplevel
    return getattr(skimage.data, name)()
  return load


def _skimage_motorcycle() -> np.ndarray:
  import skimage.data  # pylint: disable=import-outside-toplevel
  left, _, _ = skimage.data.stereo_motorcycle()
  return left


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from sklearn.datasets import load_sample_image  # pylint: disable=import-outside-toplevel
    return load_sample_image(filename)
  return load


# Order fixes the labels: label = index in this tuple. Append only, and bump the builder VERSION.
PHOTOS: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("astronaut", _skimage("astronaut")),  # 512 x 512
    ("chelsea", _skimage("chelsea")),  # 300 x 451, a cat
    ("china", _sklearn("china.jpg")),  # 427 x 640
    ("coffee", _skimage("coffee")),  # 400 x 600
    ("flower", _sklearn("flower.jpg")),  # 427 x 640
    ("hubble_deep_field", _skimage("hubble_deep_field")),  # 872 x 1000
    ("immunohistochemistry", _skimage("immunohistochemistry")),  # 512 x 512
    ("motorcycle", _skimage_motorcycle),  # 500 x 741, left view of the stereo pair
    ("retina", _skimage("retina")),  # 1411 x 1411
    ("rocket", _skimage("rocket")),  # 427 x 640
)
PHOTO_NAMES: tuple[str, ...] = tuple(name for name, _ in PHOTOS)
HELD_OUT: tuple[str, ...] = ("chelsea", "china")
TRAIN_PHOTOS: tuple[str, ...] = tuple(name for name in PHOTO_NAMES if name not in HELD_OUT)


def load_photo(name: str) -> np.ndarray:
  """The photo `name` as uint8 [H, W, 3], read from the installed packages (no network)."""
  loaders = dict(PHOTOS)
  if name not in loaders:
    raise ValueError(f"unknown embedded photo {name!r}; photos: {list(PHOTO_NAMES)}")
  try:
    photo = np.asarray(loaders[name]())
  except (ImportError, OSError, ValueError) as e:  # a package release that moved the file online
    raise RuntimeError(
        f"embedded photo {name!r} could not be read offline from the installed scikit-image / "
        f"scikit-learn ({type(e).__name__}: {e})") from e
  if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
    raise RuntimeError(f"embedded photo {name!r} is {photo.dtype} {photo.shape}, expected uint8 RGB")
  return photo


class EmbeddedPhotos(tfds.core.GeneratorBasedBuilder):
  """Real RGB photos shipped by scikit-image and scikit-learn, split into train/test by photo."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "10 photos; chelsea and china held out."}
  # TFDS looks for a checksums file beside the builder's code, and its look-up imports
  # `importlib_resources`, a backport that Python >= 3.9 installs lack. Nothing is downloaded here.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not `dataset_info_from_configs`), which would look for metadata files beside
    # this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png"),
            "label": tfds.features.ClassLabel(names=PHOTO_NAMES),
            "name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(TRAIN_PHOTOS), "test": self._generate_examples(HELD_OUT)}

  def _generate_examples(self, names):
    for name in names:
      yield name, {"image": _png(load_photo(name)), "label": PHOTO_NAMES.index(name), "name": name}


def _png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes, written by PIL: TFDS would encode a numpy array with TensorFlow."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="png", compress_level=1)  # 2-3x faster than 6
  return buffer.getvalue()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """`data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (TFDS's own default)."""
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return pathlib.Path(data_dir).expanduser()


def prepare(data_dir: str | os.PathLike | None = None) -> EmbeddedPhotos:
  """Returns the builder, building the array_record files first if they are not there yet.

  Safe when several processes of one host call it at once: a file lock lets one build while the
  others wait and then reuse its files.
  """
  root = resolve_data_dir(data_dir)
  builder = EmbeddedPhotos(data_dir=os.fspath(root), file_format="array_record")
  if builder.is_prepared():
    return builder
  root.mkdir(parents=True, exist_ok=True)
  with open(root / f"{NAME}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = EmbeddedPhotos(data_dir=os.fspath(root), file_format="array_record")
      if not builder.is_prepared():
        builder.download_and_prepare(
            download_dir=os.fspath(root / "downloads"),
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return EmbeddedPhotos(data_dir=os.fspath(root), file_format="array_record")
