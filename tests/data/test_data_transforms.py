"""bitgen.data.transforms: resize, crops, flips and the [-1, 1] range on small synthetic images."""

import numpy as np
import pytest

from bitgen.data import transforms


def _ramp(height, width):
  """uint8 [H, W, 3] whose pixels all differ, so a crop's content pins its position."""
  values = np.arange(height * width * 3).reshape(height, width, 3)
  return (values % 251).astype(np.uint8)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_resize_short_side_keeps_aspect(shape):
  out = transforms.resize_short_side(_ramp(*shape), 20)
  assert min(out.shape[:2]) == 20 and out.dtype == np.uint8 and out.shape[-1] == 3
  assert out.shape[0] / out.shape[1] == pytest.approx(shape[0] / shape[1], rel=0.05)


def test_random_crop_flip_is_a_window_or_its_mirror():
  image = _ramp(20, 30)
  rng = np.random.default_rng(0)
  flips = 0
  for _ in range(40):
    patch = transforms.random_crop_flip(image, 8, rng)
    assert patch.shape == (8, 8, 3)
    windows = [image[t:t + 8, l:l + 8] for t in range(13) for l in range(23)]
    plain = any(np.array_equal(patch, w) for w in windows)
    mirrored = any(np.array_equal(patch[:, ::-1], w) for w in windows)
    assert plain or mirrored
    flips += mirrored and not plain
  assert 0 < flips < 40  # both orientations occur


def test_grid_offsets_span_corner_to_corner():
  offsets = transforms.grid_offsets(20, 30, 8, 3)
  assert len(offsets) == 9 and len(set(offsets)) == 9
  assert offsets[0] == (0, 0) and offsets[-1] == (12, 22)


def test_center_crop():
  image = _ramp(10, 12)
  np.testing.assert_array_equal(transforms.center_crop(image, 4), image[3:7, 4:8])


def test_to_model_range_endpoints():
  out = transforms.to_model_range(np.array([0, 255], np.uint8))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [-1.0, 1.0])


def test_crop_larger_than_image_is_an_error():
  with pytest.raises(ValueError, match="cannot take a 16 px crop from a 10 x 40 image"):
    transforms.random_crop_flip(_ramp(10, 40), 16, np.random.default_rng(0))
  with pytest.raises(ValueError, match="cannot take a 16 px crop"):
    transforms.grid_offsets(10, 40, 16, 2)
