"""Binary Spherical Quantization (BSQ-ViT, Zhao et al. 2024), as the official `BinarySphericalQuantizer`.

For inputs `u` (..., L), which the caller L2-normalises (the official quantizer does not), the code is
`sign(u) / sqrt(L)` with sign(0) = -1 and the straight-through gradient scaled like the official one:
`quantized = (u + stop_gradient(sign(u) - u)) / sqrt(L)`, so d quantized / du = 1 / sqrt(L).

Loss (official forward, soft entropy):
  beta * commitment + zeta * (gamma0 * H_persample - gamma * H_codebook) / inv_temperature,
  commitment = mean over tokens of sum_L (stop_gradient(quantized) - u)**2.
Soft entropy (Sec. 3.2 of arXiv 1911.05894), two modes for the per-sample term:
- "group": the L bits are split into L/G groups of G consecutive channels; each group gets a softmax
  over its 2**G sub-codes with logits 2 * inv_temperature * <u_g, c / sqrt(L)>; entropies are summed
  over groups. The codebook entropy is the entropy of the token-mean of those softmaxes, per group.
- "analytical": per bit, p = sigmoid(-4 * inv_temperature * u / sqrt(L)) and [p, 1 - p] replaces the
  group softmax, for the per-sample AND (an official quirk) the codebook entropy, which becomes the sum
  over the L bits of the binary entropy of the token-mean of p, independent of G.
Entropies use the official `-sum p * log(p + 1e-8)` (nats).
"""

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from bitgen.quantizers import bits as bits_lib
from bitgen.quantizers import ops
from bitgen.quantizers import stats
from bitgen.quantizers.base import QuantizerOutput

ENTROPY_LOG_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class BSQConfig:
  """Hyper-parameters of BSQ; defaults are the BSQ-ViT ones (beta 0.25 is what `VITBSQModel` uses)."""

  num_bits: int
  group_size: int = 9
  persample_entropy: Literal["group", "analytical"] = "group"
  inv_temperature: float = 1.0
  beta: float = 0.25
  gamma0: float = 1.0
  gamma: float = 1.0
  zeta: float = 1.0
  l2_norm: bool = True  # codes on the unit sphere (/ sqrt(L)); the official config always sets it
  bit_order: bits_lib.BitOrder = "msb"

  def __post_init__(self):
    if not isinstance(self.num_bits, int) or self.num_bits < 1:
      raise ValueError(f"BSQ num_bits must be a positive integer, got {self.num_bits!r}")
    if not isinstance(self.group_size, int) or self.group_size < 1:
      raise ValueError(f"BSQ group_size must be a positive integer, got {self.group_size!r}")
    if self.num_bits % self.group_size:
      raise ValueError(
          f"BSQ num_bits={self.num_bits} is not divisible by group_size={self.group_size}")
    if self.persample_entropy not in ("group", "analytical"):
      raise ValueError(
          f"BSQ persample_entropy must be 'group' or 'analytical', got {self.persample_entropy!r}")
    if self.inv_temperature <= 0:
      raise ValueError(f"BSQ inv_temperature must be > 0, got {self.inv_temperature}")
    if self.bit_order not in ("msb", "lsb"):
      raise ValueError(f"BSQ bit_order must be 'msb' or 'lsb', got {self.bit_order!r}")

  @property
  def dim(self) -> int:
    """Input channels."""
    return self.num_bits

  @property
  def code_scale(self) -> float:
    return 1.0 / math.sqrt(self.num_bits) if self.l2_norm else 1.0


def _entropy(probs: jax.Array) -> jax.Array:
  """Official `get_entropy(normalize=False)` over the last axis, in nats."""
  return -jnp.sum(probs * jnp.log(probs + ENTROPY_LOG_EPS), axis=-1)


def group_codebook(group_size: int) -> jax.Array:
  """(2**G, G) +-1 sub-codes; row j holds the bits of j, MSB-first (the official buffer)."""
  return bits_lib.bits_to_signs(
      bits_lib.indices_to_bits(jnp.arange(2 ** group_size), group_size, "msb"))


def soft_entropy(u: jax.Array, config: BSQConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Official `soft_entropy_loss`: (per-sample entropy, codebook entropy, avg_prob).

  avg_prob is (L/G, 2**G) in group mode, (L, 2) in analytical mode.
  """
  tau = config.inv_temperature
  num_groups = config.num_bits // config.group_size
  if config.persample_entropy == "analytical":
    scaled = u / math.sqrt(config.num_bits) if config.l2_norm else u
    p = jax.nn.sigmoid(-4 * scaled * tau)
    probs = jnp.stack([p, 1 - p], axis=-1)  # [..., L, 2]
  else:
    codebook = group_codebook(config.group_size) / (
        math.sqrt(config.num_bits) if config.l2_norm else 1.0)
    grouped = u.reshape(*u.shape[:-1], num_groups, config.group_size)  # [..., g, G]
    # [..., g, 2**G]
    distance = -2 * jnp.einsum("...gc,dc->...gd", grouped, codebook)
    probs = jax.nn.softmax(-distance * tau, axis=-1)
  persample = jnp.mean(jnp.sum(_entropy(probs), axis=-1))
  avg_prob = jnp.mean(probs.reshape(-1, *probs.shape[-2:]), axis=0)
  return persample, jnp.sum(_entropy(avg_prob)), avg_prob


def group_indices(bits: jax.Array, group_size: int) -> jax.Array:
  """(..., L) bits -> (..., L/G) int32 index of each group of G channels, MSB-first (official)."""
  num_bits = bits.shape[-1]
  if num_bits % group_size:
    raise ValueError(f"{num_bits} bits are not divisible by group_size={group_size}")
  grouped = bits.reshape(*bits.shape[:-1], num_bits // group_size, group_size)
  return bits_lib.bits_to_indices(grouped, "msb")


def group_indices_to_bits(indices: jax.Array, group_size: int) -> jax.Array:
  """Inverse of `group_indices`: (..., L/G) -> (..., L) bits."""
  grouped = bits_lib.indices_to_bits(indices, group_size, "msb")
  return grouped.reshape(*indices.shape[:-1], -1)


def decode_codes(bits: jax.Array, config: BSQConfig) -> jax.Array:
  """(..., L) bits -> (..., L) codebook entries +-1/sqrt(L) (official `get_codebook_entry`)."""
  if bits.shape[-1] != config.num_bits:
    raise ValueError(f"BSQ expects codes of shape (..., {config.num_bits}), got {tuple(bits.shape)}")
  return bits_lib.bits_to_signs(bits) * config.code_scale


def decode_indices(indices: jax.Array, config: BSQConfig) -> jax.Array:
  """(...,) int indices (in `config.bit_order`) -> (..., L) codebook entries."""
  return decode_codes(bits_lib.indices_to_bits(indices, config.num_bits, config.bit_order), config)


def quantize(u: jax.Array, config: BSQConfig, *, compute_loss: bool = True) -> QuantizerOutput:
  """Quantizes u (..., L). With compute_loss=False the loss is 0 and only usage metrics are kept."""
  ops.check_last_dim(u, config.num_bits, "BSQ")
  u_wide = ops.at_least_float32(u)  # losses in float32 also for bfloat16 latents
  quantized = ops.straight_through(u_wide, ops.sign_values(u_wide)) * config.code_scale
  codes = bits_lib.signs_to_bits(u)
  indices = (bits_lib.bits_to_indices(codes, config.bit_order)
             if config.num_bits <= bits_lib.MAX_INDEX_BITS else None)
  metrics = stats.usage_metrics(codes)
  loss = jnp.zeros((), u_wide.dtype)
  if compute_loss:
    commitment = jnp.mean(jnp.sum((jax.lax.stop_gradient(quantized) - u_wide) ** 2, axis=-1))
    persample, codebook, avg_prob = soft_entropy(u_wide, config)
    penalty = config.gamma0 * persample - config.gamma * codebook
    loss = config.beta * commitment + config.zeta * penalty / config.inv_temperature
    metrics.update(commitment=commitment, persample_entropy=persample,
                   codebook_entropy=codebook, avg_prob=avg_prob)
  return QuantizerOutput(quantized=quantized.astype(u.dtype), codes=codes, indices=indices,
                         loss=loss, metrics=jax.lax.stop_gradient(metrics))
