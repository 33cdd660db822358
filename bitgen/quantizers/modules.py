"""Thin NNX wrappers (no parameters) around the pure quantizer functions.

Every wrapper has `dim` (channels it consumes), `num_bits` (log2 of the codebook size),
`__call__(z, *, compute_loss=True) -> QuantizerOutput`, `decode_codes(codes)` and
`decode_indices(indices)` (codes / indices as in the `QuantizerOutput` it returns).
"""

import jax
from flax import nnx

from bitgen.quantizers import bsq
from bitgen.quantizers.base import QuantizerOutput


class BSQ(nnx.Module):
  """Binary spherical quantizer; call it on L2-normalised inputs of shape (..., num_bits)."""

  def __init__(self, config: bsq.BSQConfig, *, rngs: nnx.Rngs | None = None):
    del rngs  # no parameters; accepted so every model part is built the same way
    self.config = config
    self.dim = config.num_bits
    self.num_bits = config.num_bits

  def __call__(self, z: jax.Array, *, compute_loss: bool = True) -> QuantizerOutput:
    return bsq.quantize(z, self.config, compute_loss=compute_loss)

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    return bsq.decode_bits(codes, self.config)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return bsq.decode_indices(indices, self.config)
