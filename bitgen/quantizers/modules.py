"""Thin NNX wrappers (no parameters) around the pure quantizer functions.

Every wrapper has `dim` (channels it consumes), `num_bits` (log2 of the codebook size; a float for
FSQ), `__call__(z, *, compute_loss=True) -> QuantizerOutput`, `decode_codes(codes)` and
`decode_indices(indices)` (codes / indices as in the `QuantizerOutput` it returns).
"""

import types
from typing import Any, ClassVar

import jax
from flax import nnx

from bitgen.quantizers import bsq
from bitgen.quantizers import fsq
from bitgen.quantizers import lfq
from bitgen.quantizers.base import QuantizerOutput


class _Quantizer(nnx.Module):
  """Holds a frozen config; `impl` is the module with the pure functions."""

  impl: ClassVar[types.ModuleType]

  def __init__(self, config: Any, *, rngs: nnx.Rngs | None = None):
    del rngs  # no parameters; accepted so every model part is built the same way
    self.config = config
    self.dim = config.dim
    self.num_bits = config.num_bits

  def __call__(self, z: jax.Array, *, compute_loss: bool = True) -> QuantizerOutput:
    return self.impl.quantize(z, self.config, compute_loss=compute_loss)

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    return self.impl.decode_codes(codes, self.config)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return self.impl.decode_indices(indices, self.config)


class BSQ(_Quantizer):
  """Binary spherical quantizer; call it on L2-normalised inputs of shape (..., num_bits)."""

  impl = bsq


class LFQ(_Quantizer):
  """Lookup-free quantizer on inputs of shape (..., num_bits)."""

  impl = lfq


class FSQ(_Quantizer):
  """Finite scalar quantizer on inputs of shape (..., len(levels)); codes are level digits."""

  impl = fsq
