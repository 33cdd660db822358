"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023) in its two official PyTorch flavours.

Each of the L channels of x (..., L) becomes sign(x) in {-1, +1} (sign(0) = -1) with the identity
straight-through gradient `x + stop_gradient(q - x)`.

Flavours (`LFQConfig.flavour`), as pinned by ../shared/parity/lfq_quantizer:
- "open_magvit2" (TencentARC/SEED-Voken `LFQ`): LSB-first indices (channel 0 = bit 0); per-sample
  entropy `-sum p * log_softmax(logits)`, codebook entropy `-sum avg_p * log(avg_p + 1e-5)`; logits
  `2 <x, c> / T` with T = 1 / inv_temperature (the official code fixes T = 0.01 = 1/100).
- "lucidrains" (vector-quantize-pytorch v1.31 `LFQ`): MSB-first indices (channel 0 = bit L-1); both
  entropies `-sum p * log(clamp(p, 1e-5))`; logits `2 <x', c'> * inv_temperature`; with
  `spherical=True` (lucidrains' BSQ option) x' = l2norm(x) and codes c' = l2norm(+-1) = +-1/sqrt(L),
  the straight-through acting on x'.
Loss (both): entropy_loss_weight * (sample_entropy_weight * H_persample - diversity_gamma * H_codebook)
  + commitment_loss_weight * mean((x' - stop_gradient(q))**2) (mean over all elements).
Defaults are Open-MAGVIT2's training weights (entropy 0.1, commitment 0.25; lucidrains' own default
commitment weight is 0).

Entropy form (`entropy`): "exact" takes the softmax over all 2**L codes, as both official codes do
(memory N * 2**L floats for N tokens); "factorized" uses the per-bit form, where the softmax over the
product codebook factorises into p_i = sigmoid(4 * inv_temperature * s * x_i) (s = code magnitude):
the per-sample entropy is the same quantity (up to the eps conventions), the codebook entropy
becomes the sum over bits of the binary entropy of the token-mean of p_i (an upper bound of the
exact one). "auto" is exact up to `EXACT_ENTROPY_MAX_BITS` = 18 bits and factorized beyond.
"""

import dataclasses
import itertools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from bitgen.quantizers import bits as bits_lib
from bitgen.quantizers import ops
from bitgen.quantizers import stats
from bitgen.quantizers.base import QuantizerOutput

EXACT_ENTROPY_MAX_BITS = 18
ENTROPY_EPS = 1e-5
Flavour = Literal["open_magvit2", "lucidrains"]
FLAVOUR_BIT_ORDER = {"open_magvit2": "lsb", "lucidrains": "msb"}


@dataclasses.dataclass(frozen=True)
class LFQConfig:
  """Hyper-parameters of LFQ (no projections: the input has num_bits channels)."""

  num_bits: int
  flavour: Flavour = "lucidrains"
  entropy_loss_weight: float = 0.1
  commitment_loss_weight: float = 0.25
  sample_entropy_weight: float = 1.0  # Open-MAGVIT2 sample_minimization_weight
  diversity_gamma: float = 1.0  # Open-MAGVIT2 batch_maximization_weight
  inv_temperature: float = 100.0
  spherical: bool = False
  entropy: Literal["auto", "exact", "factorized"] = "auto"
  bit_order: bits_lib.BitOrder | None = None  # None: the flavour's (lsb for Open-MAGVIT2)

  def __post_init__(self):
    if not isinstance(self.num_bits, int) or self.num_bits < 1:
      raise ValueError(f"LFQ num_bits must be a positive integer, got {self.num_bits!r}")
    if self.flavour not in FLAVOUR_BIT_ORDER:
      raise ValueError(f"LFQ flavour must be one of {sorted(FLAVOUR_BIT_ORDER)}, got {self.flavour!r}")
    if self.entropy not in ("auto", "exact", "factorized"):
      raise ValueError(f"LFQ entropy must be 'auto', 'exact' or 'factorized', got {self.entropy!r}")
    if self.bit_order not in (None, "msb", "lsb"):
      raise ValueError(f"LFQ bit_order must be 'msb', 'lsb' or None, got {self.bit_order!r}")
    if self.inv_temperature <= 0:
      raise ValueError(f"LFQ inv_temperature must be > 0, got {self.inv_temperature}")

  @property
  def dim(self) -> int:
    """Input channels."""
    return self.num_bits

  @property
  def order(self) -> bits_lib.BitOrder:
    return self.bit_order or FLAVOUR_BIT_ORDER[self.flavour]

  @property
  def exact_entropy(self) -> bool:
    if self.entropy == "auto":
      return self.num_bits <= EXACT_ENTROPY_MAX_BITS
    return self.entropy == "exact"


def _clamped_entropy(probs: jax.Array) -> jax.Array:
  """lucidrains: -sum p * log(clamp(p, 1e-5)) over the last axis."""
  return -jnp.sum(probs * jnp.log(jnp.maximum(probs, ENTROPY_EPS)), axis=-1)


def _shifted_entropy(probs: jax.Array) -> jax.Array:
  """Open-MAGVIT2 codebook entropy: -sum p * log(p + 1e-5) over the last axis."""
  return -jnp.sum(probs * jnp.log(probs + ENTROPY_EPS), axis=-1)


def _entropies(logits: jax.Array, flavour: Flavour) -> tuple[jax.Array, jax.Array]:
  """logits (N, ..., K) over K choices -> (mean over N of sum over ... of H(p), sum over ... H(avg p))."""
  probs = jax.nn.softmax(logits, axis=-1)
  avg_probs = jnp.mean(probs, axis=0)
  if flavour == "open_magvit2":
    persample = -jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    codebook = _shifted_entropy(avg_probs)
  else:
    persample = _clamped_entropy(probs)
    codebook = _clamped_entropy(avg_probs)
  return jnp.mean(jnp.sum(persample.reshape(persample.shape[0], -1), axis=-1)), jnp.sum(codebook)


def _scale_logits(inner: jax.Array, config: LFQConfig) -> jax.Array:
  if config.flavour == "open_magvit2":
    return 2 * inner / (1.0 / config.inv_temperature)
  return 2 * inner * config.inv_temperature


def entropy_terms(x: jax.Array, config: LFQConfig) -> tuple[jax.Array, jax.Array]:
  """(per-sample entropy, codebook entropy) in nats of the (maybe l2-normalised) input x (..., L)."""
  tokens = x.reshape(-1, config.num_bits)
  if config.exact_entropy:
    codebook = decode_codes(
        bits_lib.indices_to_bits(jnp.arange(2 ** config.num_bits), config.num_bits, config.order),
        config)
    # [N, 2**L]
    logits = _scale_logits(jnp.einsum("nd,kd->nk", tokens, codebook), config)
    return _entropies(logits, config.flavour)
  magnitude = 1 / math.sqrt(config.num_bits) if config.spherical else 1.0
  # Per bit, the two choices +-magnitude: logits [N, L, 2].
  inner = tokens * magnitude
  logits = _scale_logits(jnp.stack([inner, -inner], axis=-1), config)
  return _entropies(logits, config.flavour)


def decode_codes(bits: jax.Array, config: LFQConfig) -> jax.Array:
  """(..., L) bits -> (..., L) codes: +-1, or +-1/sqrt(L) when spherical."""
  if bits.shape[-1] != config.num_bits:
    raise ValueError(f"LFQ expects codes of shape (..., {config.num_bits}), got {tuple(bits.shape)}")
  signs = bits_lib.bits_to_signs(bits)
  return ops.l2_normalize(signs) if config.spherical else signs


def decode_indices(indices: jax.Array, config: LFQConfig) -> jax.Array:
  """(...,) int indices (in `config.order`) -> (..., L) codes."""
  return decode_codes(bits_lib.indices_to_bits(indices, config.num_bits, config.order), config)


def factorized_indices(bits: jax.Array, split: tuple[int, ...], order: bits_lib.BitOrder = "lsb"
                       ) -> tuple[jax.Array, ...]:
  """Open-MAGVIT2 token factorisation: one index per consecutive chunk of `split` channels."""
  if sum(split) != bits.shape[-1]:
    raise ValueError(f"factorized split {split} does not sum to the {bits.shape[-1]} bits")
  bounds = [0, *itertools.accumulate(split)]
  return tuple(bits_lib.bits_to_indices(bits[..., lo:hi], order)
               for lo, hi in zip(bounds[:-1], bounds[1:]))


def quantize(x: jax.Array, config: LFQConfig, *, compute_loss: bool = True) -> QuantizerOutput:
  """Quantizes x (..., L). With compute_loss=False the loss is 0 and only usage metrics are kept."""
  ops.check_last_dim(x, config.num_bits, "LFQ")
  if config.spherical:
    x = ops.l2_normalize(x)
  codes = bits_lib.signs_to_bits(x)
  code_values = decode_codes(codes, config).astype(x.dtype)
  quantized = ops.straight_through(x, code_values)
  indices = (bits_lib.bits_to_indices(codes, config.order)
             if config.num_bits <= bits_lib.MAX_INDEX_BITS else None)
  metrics = stats.usage_metrics(codes)
  loss = jnp.zeros((), x.dtype)
  if compute_loss:
    commitment = jnp.mean((x - jax.lax.stop_gradient(code_values)) ** 2)
    persample, codebook = entropy_terms(x, config)
    entropy_aux = config.sample_entropy_weight * persample - config.diversity_gamma * codebook
    loss = config.entropy_loss_weight * entropy_aux + config.commitment_loss_weight * commitment
    metrics.update(commitment=commitment, persample_entropy=persample, codebook_entropy=codebook)
  return QuantizerOutput(quantized=quantized, codes=codes, indices=indices, loss=loss,
                         metrics=jax.lax.stop_gradient(metrics))
