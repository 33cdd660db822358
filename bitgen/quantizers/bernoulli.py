"""Bernoulli quantizer of Binary Latent Diffusion (Wang et al. 2023).

The encoder predicts a probability per latent bit, p = sigmoid(proj(h)). Training draws
bits ~ Bernoulli(p); evaluation thresholds p > 0.5. The decoder sees `bits + p - stop_grad(p)`:
the value of the bits with the gradient of p (straight-through). The expression is kept literally,
as in the official code, so its float32 value carries the same 1-ulp noise as the reference.
"""

import jax
import jax.numpy as jnp

from bitgen.quantizers.base import QuantizerOutput
from bitgen.quantizers.bits import MAX_INDEX_BITS, bits_to_indices
from bitgen.quantizers.stats import usage_metrics


def bernoulli_quantize(
    probs: jax.Array, *, key: jax.Array | None = None, code_weight: float = 0.0
) -> QuantizerOutput:
  """probs: (..., C) Bernoulli probabilities in [0, 1], bit axis last.

  key=None thresholds (p > 0.5, evaluation); a PRNG key samples bits ~ Bernoulli(p) (training).
  `loss` is `code_weight * codebook_loss`, where the official codebook loss is
  mean(sigmoid(p) * (1 - sigmoid(p))): sigmoid applied a second time to the probabilities
  (the official weight is 0).
  """
  if not jnp.issubdtype(probs.dtype, jnp.floating):
    raise TypeError(f"bernoulli_quantize takes float probabilities, got {probs.dtype}")
  if key is None:
    bits = probs > 0.5
  else:
    bits = jax.random.uniform(key, probs.shape, probs.dtype) < probs
  bits_f = bits.astype(probs.dtype)
  # (bits + p) - p, left to right as the reference: value = bits, gradient = d/dp.
  quantized = bits_f + probs - jax.lax.stop_gradient(probs)
  twice = jax.nn.sigmoid(probs)
  codebook_loss = jnp.mean(twice * (1 - twice))
  codes = bits.astype(jnp.uint8)
  num_bits = probs.shape[-1]
  indices = bits_to_indices(codes) if num_bits <= MAX_INDEX_BITS else None
  metrics = {"codebook_loss": codebook_loss, **usage_metrics(codes)}
  return QuantizerOutput(
      quantized=quantized, codes=codes, indices=indices, loss=code_weight * codebook_loss,
      metrics=metrics)
