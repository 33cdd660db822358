"""The interface every quantizer (BSQ, LFQ, FSQ, multi-scale, Bernoulli) returns."""

import flax.struct
import jax


@flax.struct.dataclass
class QuantizerOutput:
  """What a quantizer returns for latents `z` of shape (..., D).

  quantized: (..., D) the values the decoder sees, with the quantizer's straight-through gradient.
  codes: (..., D) integer digits per channel: bits {0,1} for binary quantizers (see `bits.py`),
    level indices for FSQ.
  indices: (...,) int32 code index where the codebook fits in int32, else None.
  loss: () the weighted quantizer loss to add to the training objective.
  metrics: named scalars and statistics: every loss term (unweighted), entropies, and
    usage statistics (`bit_entropy` per bit, `code_usage`); never differentiated through.
  """

  quantized: jax.Array
  codes: jax.Array
  indices: jax.Array | None
  loss: jax.Array
  metrics: dict[str, jax.Array]
