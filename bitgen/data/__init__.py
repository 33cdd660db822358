"""Input data: the embedded photos TFDS dataset, standard TFDS datasets, and grain pipelines."""

from bitgen.data.embedded_photos import EmbeddedPhotos, HELD_OUT, PHOTO_NAMES, TRAIN_PHOTOS
from bitgen.data.pipeline import DataConfig, eval_images, get_config, make_pipeline, num_classes, parse_config
from bitgen.data.sources import DatasetNotPreparedError
