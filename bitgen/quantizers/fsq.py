"""Finite Scalar Quantization (Mentzer et al. 2023), lucidrains' variant (vector-quantize-pytorch v1.31).

Channel d of z (..., D) with L_d levels:
  half_l = (L - 1) * (1 + 1e-3) / 2,  offset = 0.5 if L is even else 0,  shift = atanh(offset / half_l)
  bounded = tanh(z + shift) * half_l - offset
  quantized = round_ste(bounded) / (L // 2)      (round half to even; identity gradient through it)
Even levels are asymmetric: L = 8 gives codes -1, -0.75, ..., +0.75. (The paper's JAX code uses
(1 - eps) and tan; codes near a rounding boundary can differ from it.) Codes are the level digits
round(bounded) + L // 2 in [0, L); the index is sum_d digit_d * basis_d, basis = cumprod([1] +
levels[:-1]) (channel 0 least significant). FSQ has no auxiliary loss.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.quantizers import bits as bits_lib
from bitgen.quantizers import ops
from bitgen.quantizers import stats
from bitgen.quantizers.base import QuantizerOutput

BOUND_EPS = 1e-3


def levels_for_bits(num_bits: int) -> tuple[int, ...]:
  """Levels of an FSQ codebook of exactly 2**num_bits codes: 4 per 2 bits, one 8 for an odd count."""
  if not isinstance(num_bits, int) or num_bits < 2:
    raise ValueError(f"FSQ needs num_bits >= 2 to pick levels (no level 2), got {num_bits!r}")
  return (8,) * (num_bits % 2) + (4,) * ((num_bits - 3 * (num_bits % 2)) // 2)


@dataclasses.dataclass(frozen=True)
class FSQConfig:
  """Give `levels`, or `num_bits` alone for `levels_for_bits(num_bits)`; num_bits = log2 prod(levels)."""

  levels: tuple[int, ...] | None = None
  num_bits: float | None = None

  def __post_init__(self):
    if self.levels is None:
      if self.num_bits is None:
        raise ValueError("FSQ config needs `levels` or `num_bits`")
      object.__setattr__(self, "levels", levels_for_bits(self.num_bits))
    levels = tuple(self.levels)
    if not levels or any(not isinstance(l, (int, np.integer)) or l < 3 for l in levels):
      raise ValueError(
          f"FSQ levels must be integers >= 3 (lucidrains' FSQ rejects 2 without symmetry "
          f"preservation), got {self.levels!r}")
    levels = tuple(int(l) for l in levels)
    object.__setattr__(self, "levels", levels)
    num_bits = math.log2(math.prod(levels))
    if self.num_bits is not None and not math.isclose(self.num_bits, num_bits):
      raise ValueError(f"FSQ levels {levels} make {num_bits:.3f} bits, not num_bits={self.num_bits}")
    object.__setattr__(self, "num_bits", num_bits)

  @property
  def dim(self) -> int:
    """Input channels."""
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  @property
  def basis(self) -> np.ndarray:
    return np.cumprod((1,) + self.levels[:-1], dtype=np.int64)


def _level_arrays(config: FSQConfig):
  levels = np.asarray(config.levels, np.int32)
  return jnp.asarray(levels), jnp.asarray(levels // 2)


def bound(z: jax.Array, config: FSQConfig) -> jax.Array:
  """The official `bound` before rounding: values in (-L/2 - eps, L/2 + eps) per channel."""
  levels, _ = _level_arrays(config)
  half_l = (levels - 1) * (1 + BOUND_EPS) / 2
  offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
  shift = jnp.arctanh(offset / half_l)
  return jnp.tanh(z + shift) * half_l - offset


def decode_codes(digits: jax.Array, config: FSQConfig) -> jax.Array:
  """(..., D) level digits -> (..., D) code values (official `_scale_and_shift_inverse`)."""
  if digits.shape[-1] != config.dim:
    raise ValueError(f"FSQ expects codes of shape (..., {config.dim}), got {tuple(digits.shape)}")
  _, half_width = _level_arrays(config)
  return (digits.astype(jnp.int32) - half_width) / half_width


def indices_to_digits(indices: jax.Array, config: FSQConfig) -> jax.Array:
  """(...,) int indices -> (..., D) int32 level digits."""
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"FSQ indices must be integers, got {indices.dtype}")
  if config.codebook_size > 2 ** bits_lib.MAX_INDEX_BITS:
    raise ValueError(f"FSQ codebook of {config.codebook_size} codes has no int32 indices; use digits")
  levels, _ = _level_arrays(config)
  basis = jnp.asarray(config.basis, jnp.int32)
  return (indices.astype(jnp.int32)[..., None] // basis) % levels


def decode_indices(indices: jax.Array, config: FSQConfig) -> jax.Array:
  """(...,) int indices -> (..., D) code values (official `indices_to_codes`)."""
  return decode_codes(indices_to_digits(indices, config), config)


def quantize(z: jax.Array, config: FSQConfig, *, compute_loss: bool = True) -> QuantizerOutput:
  """Quantizes z (..., D). FSQ has no loss: `compute_loss` is accepted for the common interface."""
  del compute_loss
  ops.check_last_dim(z, config.dim, "FSQ")
  _, half_width = _level_arrays(config)
  bounded = bound(ops.at_least_float32(z), config)  # as the official force_quantization_f32
  rounded = jnp.round(bounded)  # half to even, like torch.round
  quantized = (ops.straight_through(bounded, rounded) / half_width).astype(z.dtype)
  digits = rounded.astype(jnp.int32) + half_width
  fits = config.codebook_size <= 2 ** bits_lib.MAX_INDEX_BITS
  indices = jnp.sum(digits * jnp.asarray(config.basis, jnp.int32), axis=-1) if fits else None
  metrics = {
      "level_entropy": stats.level_entropy(digits, config.levels),
      **stats.code_usage(indices[..., None] if fits else digits, config.codebook_size),
  }
  return QuantizerOutput(quantized=quantized, codes=digits, indices=indices,
                         loss=jnp.zeros((), jnp.float32), metrics=jax.lax.stop_gradient(metrics))
