"""BLD pipeline: official checkpoints -> PNG grid; AE/prior pairing errors."""

import numpy as np
import pytest
from conftest import PARITY_DIR, load_parity
from PIL import Image

from bitgen.sample import bld
from configs import bld as bld_configs


@pytest.fixture(scope="module")
def checkpoints():
  load_parity("bld", "weights_ae.npz")  # skips when the fixtures are absent
  return PARITY_DIR / "bld" / "weights_ae.npz", PARITY_DIR / "bld" / "weights_sampler.npz"


def test_sample_png_from_official_checkpoints(tmp_path, checkpoints):
  ae_path, den_path = checkpoints
  path = bld.sample_png(bld_configs.get_config("tiny"), tmp_path / "grid.png", autoencoder_checkpoint=ae_path,
                        denoiser_checkpoint=den_path, batch=3, steps=4, guidance=1.0, columns=2)
  image = np.asarray(Image.open(path))
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert np.all(image[32:, 32:] == 255)  # 3 images in a 2x2 grid: the last cell is blank
  assert image[:32, :32].std() > 0


def test_bits_mismatch_between_autoencoder_and_prior(checkpoints):
  _, den_path = checkpoints
  config = bld_configs.get_config("tiny")
  config.denoiser.num_bits = 16
  with pytest.raises(ValueError, match="bits mismatch: the autoencoder has num_bits=32"):
    bld.build(config)
  config = bld_configs.get_config("tiny")
  config.denoiser.latent_size = 4
  with pytest.raises(ValueError, match="latent grid mismatch"):
    bld.build(config)
  config = bld_configs.get_config("tiny")
  config.autoencoder.emb_dim = 32
  with pytest.raises(ValueError, match=r"codebook \(32, 64\)"):
    bld.build(config, denoiser_checkpoint=den_path)


def test_sampling_more_steps_than_trained_is_an_error(tmp_path, checkpoints):
  ae_path, den_path = checkpoints
  with pytest.raises(ValueError, match=r"sampling steps \(20\) exceed the 16"):
    bld.sample_png(bld_configs.get_config("tiny"), tmp_path / "x.png", autoencoder_checkpoint=ae_path,
                   denoiser_checkpoint=den_path, batch=1, steps=20)


def test_image_grid_layout():
  images = np.stack([np.full((2, 2, 3), v, np.float32) for v in (-1.0, 1.0, 0.0)])
  grid = bld.image_grid(images, columns=3)
  assert grid.shape == (2, 6, 3)
  np.testing.assert_array_equal(grid[0, ::2, 0], [0, 255, 128])
