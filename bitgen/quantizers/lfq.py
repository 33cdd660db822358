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

Entropy form (`entropy`): "exact" is the official softmax over all 2**L codes; since the logits are
a sum over channels it factorises over the two halves of the channels, so it is computed without the
official [N, 2**L] table (memory N * 2**(L/2) + 2**L; see `_exact_entropies`). "factorized" is the
per-bit form p_i = sigmoid(4 * inv_temperature * s * x_i) (s = code magnitude): the per-sample
entropy is the same quantity (exactly for Open-MAGVIT2; up to where lucidrains' clamp acts), the
codebook entropy becomes the sum over bits of the binary entropy of the token-mean of p_i (an upper
bound of the exact one). "auto" is exact up to `EXACT_ENTROPY_MAX_BITS` = 18 bits, factorized beyond.
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


def _codebook_entropy(avg_probs: jax.Array, flavour: Flavour) -> jax.Array:
  """Entropy of the batch-mean distribution over the last axis, in the flavour's eps convention."""
  if flavour == "open_magvit2":
    return -jnp.sum(avg_probs * jnp.log(avg_probs + ENTROPY_EPS), axis=-1)
  return _clamped_entropy(avg_probs)


def _clamped_product_entropy(pa, la, pb, lb) -> jax.Array:
  """Per token, -sum_{a,b} p log(clamp(p, 1e-5)) for p = pa * pb, without the [N, A, B] table.

  pa, la: [N, A] probabilities and log-probabilities of the first half; pb, lb: [N, B]. For each a,
  the b with la + lb >= log(eps) (p >= eps) are a prefix of the b sorted by lb, descending: prefix
  sums of pb and pb * lb give their share; every other b contributes p * log(eps).
  """
  log_eps = jnp.log(jnp.float32(ENTROPY_EPS))
  order = jnp.argsort(-jax.lax.stop_gradient(lb), axis=-1)
  pb_sorted = jnp.take_along_axis(pb, order, axis=-1)
  lb_sorted = jnp.take_along_axis(lb, order, axis=-1)
  zero = jnp.zeros_like(pb[:, :1])
  cum_p = jnp.concatenate([zero, jnp.cumsum(pb_sorted, axis=-1)], axis=-1)  # [N, B + 1]
  cum_pl = jnp.concatenate([zero, jnp.cumsum(pb_sorted * lb_sorted, axis=-1)], axis=-1)
  # [N, A]: how many of the sorted b have lb >= log(eps) - la.
  kept = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="right"))(
      -jax.lax.stop_gradient(lb_sorted), jax.lax.stop_gradient(la - log_eps))
  p_kept = jnp.take_along_axis(cum_p, kept, axis=-1)
  pl_kept = jnp.take_along_axis(cum_pl, kept, axis=-1)
  inner = la * p_kept + pl_kept + log_eps * (cum_p[:, -1:] - p_kept)  # [N, A]
  return -jnp.sum(pa * inner, axis=-1)


def _scale_logits(inner: jax.Array, config: LFQConfig) -> jax.Array:
  if config.flavour == "open_magvit2":
    return 2 * inner / (1.0 / config.inv_temperature)
  return 2 * inner * config.inv_temperature


def _code_magnitude(config: LFQConfig) -> float:
  return 1 / math.sqrt(config.num_bits) if config.spherical else 1.0


def _exact_entropies(tokens: jax.Array, config: LFQConfig) -> tuple[jax.Array, jax.Array]:
  """The official softmax over all 2**L codes, computed through its two halves.

  The logits 2 tau <x, c> are a sum over channels, so the softmax over the product codebook is the
  product of the softmaxes over the sub-codes of each half of the channels: p(c) = pa(c_a) pb(c_b).
  Memory O(N 2**(L/2) + 2**L) and one [A, N] x [N, B] matmul for the batch-mean distribution.
  """
  half_probs = []
  for part in jnp.split(tokens, [(config.num_bits + 1) // 2], axis=-1):
    width = part.shape[-1]
    if width == 0:
      half_probs.append((jnp.ones_like(tokens[:, :1]), jnp.zeros_like(tokens[:, :1])))
      continue
    sub_codes = bits_lib.bits_to_signs(
        bits_lib.indices_to_bits(jnp.arange(2 ** width), width)) * _code_magnitude(config)
    # [N, 2**width]
    logits = _scale_logits(jnp.einsum("nd,kd->nk", part, sub_codes), config)
    half_probs.append((jax.nn.softmax(logits, axis=-1), jax.nn.log_softmax(logits, axis=-1)))
  (pa, la), (pb, lb) = half_probs
  if config.flavour == "open_magvit2":
    # -sum_c p log_softmax(c) = H(pa) + H(pb).
    persample = -jnp.sum(pa * la, axis=-1) - jnp.sum(pb * lb, axis=-1)
  else:
    persample = _clamped_product_entropy(pa, la, pb, lb)
  # [A, B]: the batch mean of pa(c_a) pb(c_b).
  avg_probs = jnp.einsum("na,nb->ab", pa, pb) / tokens.shape[0]
  return jnp.mean(persample), _codebook_entropy(avg_probs.reshape(-1), config.flavour)


def _factorized_entropies(tokens: jax.Array, config: LFQConfig) -> tuple[jax.Array, jax.Array]:
  """Per bit: the two choices +-magnitude of each channel, entropies summed over bits."""
  inner = tokens * _code_magnitude(config)
  logits = _scale_logits(jnp.stack([inner, -inner], axis=-1), config)  # [N, L, 2]
  probs = jax.nn.softmax(logits, axis=-1)
  if config.flavour == "open_magvit2":
    persample = -jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=(-2, -1))
  else:
    persample = jnp.sum(_clamped_entropy(probs), axis=-1)
  codebook = jnp.sum(_codebook_entropy(jnp.mean(probs, axis=0), config.flavour))
  return jnp.mean(persample), codebook


def entropy_terms(x: jax.Array, config: LFQConfig) -> tuple[jax.Array, jax.Array]:
  """(per-sample entropy, codebook entropy) in nats of the (maybe l2-normalised) input x (..., L)."""
  tokens = x.reshape(-1, config.num_bits)
  if config.exact_entropy:
    return _exact_entropies(tokens, config)
  return _factorized_entropies(tokens, config)


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
  input_dtype = x.dtype
  x = ops.at_least_float32(x)  # as the official force_quantization_f32
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
  return QuantizerOutput(quantized=quantized.astype(input_dtype), codes=codes, indices=indices,
                         loss=loss, metrics=jax.lax.stop_gradient(metrics))
