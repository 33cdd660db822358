"""Infinity's official scale schedules (infinity/utils/dynamic_resolution.py)."""

import pytest
from conftest import load_parity

from bitgen.models import infinity_schedules as sched


def test_resolutions_pick_official_prefixes():
  s256 = sched.schedule_for_resolution(256, 256)
  assert s256.num_scales == 7 and s256.grids == sched.FULL_GRIDS[1.0][:7] and s256.latent_grid == (16, 16)
  s1024 = sched.schedule_for_resolution(1024, 1024)
  assert s1024.num_scales == 13 and s1024.latent_grid == (64, 64) and s1024.num_tokens == 10521
  assert sched.schedule_for_resolution(512, 512) == sched.schedule_for(1.0, "0.25M")
  wide = sched.schedule_for_resolution(1 * 16 * 56, 16 * 70)  # 1M of ratio 0.8 is the transpose of 1.25
  assert wide.ratio == 0.8 and wide.latent_grid == (56, 70) and wide.rope_grid == (56, 70)
  tall = sched.schedule_for(1.25, "0.06M")
  assert tall.image_size == (320, 256) and tall.rope_grid == (70, 56)


def test_matches_fixture_schedule_and_token_scales():
  io = load_parity("infinity_transformer", "io.npz")
  s = sched.schedule_for(1.0, "0.06M")
  assert s.as_official() == [tuple(int(v) for v in row) for row in io["scale_schedule"]]
  assert list(s.scale_of_token()) == io["scale_index_per_token"].tolist()
  assert s.offsets[:3] == (0, 1, 5)


def test_unknown_schedules_raise():
  with pytest.raises(ValueError, match="no official Infinity scale schedule for 300x300"):
    sched.schedule_for_resolution(300, 300)
  with pytest.raises(ValueError, match="unknown resolution name"):
    sched.schedule_for(1.0, "2M")
  with pytest.raises(ValueError, match="unknown aspect ratio"):
    sched.schedule_for(1.1, "1M")
  with pytest.raises(ValueError, match="not a prefix"):
    sched.Schedule(1.0, ((1, 1), (3, 3)))
  with pytest.raises(ValueError, match="out of range"):
    sched.schedule_for(1.0, "0.06M").prefix(8)
  assert sched.nearest_ratio(1.1) == 1.0 and sched.nearest_ratio(0.7) == 0.666
  with pytest.raises(ValueError, match="reaches a 7x7 latent"):
    sched.grids_for_latent(7, 7)


def test_default_grids_for_a_latent():
  assert sched.grids_for_latent(16, 16) == sched.schedule_for_resolution(256, 256).grids
  assert sched.grids_for_latent(8, 8) == ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8))
  assert sched.grids_for_latent(10, 8) == sched.FULL_GRIDS[1.25][:5]
