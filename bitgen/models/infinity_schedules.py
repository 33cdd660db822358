"""Infinity's scale schedules: the (h, w) token grid of every scale, per aspect ratio and resolution.

The official table (`infinity/utils/dynamic_resolution.py`) gives 13 scales per height/width ratio;
a resolution uses a prefix: 7 scales ('0.06M', 256x256 at 1:1), 10 ('0.25M', 512x512), 12
('0.60M', 768x768) or all 13 ('1M', 1024x1024). The VAE's spatial stride is 16, so the last grid
times 16 is the image size. Ratios below 1 are the transposed grids of their inverse (keyed by
`int(1 / r * 1000) / 1000`, as official). Images have one frame: t = 1 for every scale.

A `Schedule` is hashable (a static argument under `jit`) and remembers its ratio, because the 2D
RoPE positions of a scale depend on the last grid of the ratio's full (1M) schedule.
"""

import dataclasses

VAE_STRIDE = 16

_RATIO_TO_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
            (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
            (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
            (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
            (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
            (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
            (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
            (72, 24), (90, 30), (111, 37)),
}

# Ratio h/w -> its 13 grids, ratios < 1 included.
FULL_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {}
for _ratio, _grids in _RATIO_TO_GRIDS.items():
  FULL_GRIDS[_ratio] = _grids
  if _ratio != 1.0:
    FULL_GRIDS[int(1 / _ratio * 1000) / 1000] = tuple((w, h) for h, w in _grids)

# Named resolutions (official `pn`) -> number of scales.
PN_NUM_SCALES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The scales of one generation: `grids[k] = (h_k, w_k)` tokens, a prefix of `FULL_GRIDS[ratio]`."""

  ratio: float
  grids: tuple[tuple[int, int], ...]

  def __post_init__(self):
    if self.ratio not in FULL_GRIDS:
      raise ValueError(
          f"unknown aspect ratio (h/w) {self.ratio}; valid ratios: {sorted(FULL_GRIDS)}")
    full = FULL_GRIDS[self.ratio]
    grids = tuple(tuple(int(v) for v in g) for g in self.grids)
    object.__setattr__(self, "grids", grids)
    if not 1 <= len(grids) <= len(full) or grids != full[:len(grids)]:
      raise ValueError(
          f"scale grids {list(grids)} are not a prefix of the official schedule for ratio "
          f"{self.ratio}: {list(full)}")

  @property
  def num_scales(self) -> int:
    return len(self.grids)

  @property
  def tokens_per_scale(self) -> tuple[int, ...]:
    return tuple(h * w for h, w in self.grids)

  @property
  def num_tokens(self) -> int:
    return sum(self.tokens_per_scale)

  @property
  def offsets(self) -> tuple[int, ...]:
    """Index of each scale's first token in the concatenated sequence (scale-major, row-major)."""
    out, total = [], 0
    for n in self.tokens_per_scale:
      out.append(total)
      total += n
    return tuple(out)

  @property
  def latent_grid(self) -> tuple[int, int]:
    """The last (full-size) grid: the VAE latent the scales add up to."""
    return self.grids[-1]

  @property
  def image_size(self) -> tuple[int, int]:
    h, w = self.latent_grid
    return h * VAE_STRIDE, w * VAE_STRIDE

  @property
  def rope_grid(self) -> tuple[int, int]:
    """Last grid of this ratio's 1M schedule: the frame RoPE positions are normalised to."""
    return FULL_GRIDS[self.ratio][-1]

  def prefix(self, num_scales: int) -> "Schedule":
    if not 1 <= num_scales <= self.num_scales:
      raise ValueError(f"prefix of {num_scales} scales out of range 1..{self.num_scales}")
    return Schedule(self.ratio, self.grids[:num_scales])

  def scale_of_token(self) -> tuple[int, ...]:
    """(L,) scale index of every token; defines the block-causal mask."""
    return tuple(k for k, n in enumerate(self.tokens_per_scale) for _ in range(n))

  def as_official(self) -> list[tuple[int, int, int]]:
    """The official (t, h, w) list with t = 1."""
    return [(1, h, w) for h, w in self.grids]


def nearest_ratio(h_div_w: float) -> float:
  """The official template nearest to a height/width ratio."""
  return min(FULL_GRIDS, key=lambda r: abs(r - h_div_w))


def schedule_for(ratio: float, pn: str) -> Schedule:
  """Official schedule for template `ratio` (a key of FULL_GRIDS) and resolution name `pn`."""
  if pn not in PN_NUM_SCALES:
    raise ValueError(f"unknown resolution name pn={pn!r}; valid: {sorted(PN_NUM_SCALES)}")
  if ratio not in FULL_GRIDS:
    raise ValueError(f"unknown aspect ratio (h/w) {ratio}; valid ratios: {sorted(FULL_GRIDS)}")
  return Schedule(ratio, FULL_GRIDS[ratio][:PN_NUM_SCALES[pn]])


def schedule_for_resolution(height: int, width: int) -> Schedule:
  """The official schedule whose images are exactly height x width pixels (e.g. 256x256 -> 7 scales)."""
  for ratio, grids in FULL_GRIDS.items():
    for num_scales in PN_NUM_SCALES.values():
      h, w = grids[num_scales - 1]
      if (h * VAE_STRIDE, w * VAE_STRIDE) == (height, width):
        return Schedule(ratio, grids[:num_scales])
  valid = sorted({(g[n - 1][0] * VAE_STRIDE, g[n - 1][1] * VAE_STRIDE)
                  for g in FULL_GRIDS.values() for n in PN_NUM_SCALES.values()})
  raise ValueError(f"no official Infinity scale schedule for {height}x{width} images; "
                   f"supported (height, width): {valid}")


def schedule_for_latent(height: int, width: int) -> Schedule:
  """The schedule ending at a latent (token) grid of height x width: the prefix of the official
  table of the nearest ratio that reaches it (16x16 -> the 7 scales of 256x256; 8x8 -> 5 scales)."""
  for ratio in sorted(FULL_GRIDS, key=lambda r: abs(r - height / width)):
    grids = FULL_GRIDS[ratio]
    if (height, width) in grids:
      return Schedule(ratio, grids[:grids.index((height, width)) + 1])
  raise ValueError(
      f"no official scale schedule reaches a {height}x{width} latent grid; pass the grids explicitly")


def grids_for_latent(height: int, width: int) -> tuple[tuple[int, int], ...]:
  """`schedule_for_latent(height, width).grids`."""
  return schedule_for_latent(height, width).grids
