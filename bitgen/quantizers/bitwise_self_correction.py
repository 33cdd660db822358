"""Infinity's bitwise self-correction (official `BitwiseSelfCorrection.flip_requant`), pure functions.

Builds the teacher-forcing inputs and labels of the transformer from continuous VAE features
[B, H, W, d] and scale grids ending at (H, W). Per scale k, in order:

    r_k    = area_resize(features - cum, (h_k, w_k))        # cum = 0 at k = 0
    bits_k = BSQ bits of r_k                                # the LABEL of scale k (clean)
    flip   = uniform_k < p_k                                # random bit flips, p_k per scale
    q_k    = bits_to_codes(where(flip, 1 - bits_k, bits_k)) # re-quantized: later scales see the flips
    cum   += bilinear_resize(q_k, (H, W))
    input of scale k+1 = bilinear_resize(cum, (h_{k+1}, w_{k+1}))   # (h*w, d) row-major

so the residuals and labels of later scales follow the corrupted path. With p = 0 (or
`requantize=False`, which feeds the clean code forward) this is plain teacher forcing.

Randomness is explicit: `draw_flip_noise(key, ...)` returns every draw (per-scale strengths and
uniforms), and `flip_requant` takes them, so recorded draws (the parity fixture) can be injected.
Strengths are `randint(0, 100 * max_strength + 1) * 0.01` per scale (official: {0, .01, ..., .30}),
compared in float32 against uniforms in [0, 1).
"""

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from bitgen.quantizers import multiscale

Grid = tuple[int, int]


@flax.struct.dataclass
class FlipNoise:
  """strengths: (K,) float32 flip probability per scale; uniforms: per scale [B, h_k, w_k, d]."""

  strengths: jax.Array
  uniforms: tuple[jax.Array, ...]


def draw_flip_noise(key: jax.Array, grids: Sequence[Grid], batch: int, num_bits: int, *,
                    max_strength: float = 0.3, num_noisy_scales: int = 13) -> FlipNoise:
  """Draws every random number of one `flip_requant` call; scales >= num_noisy_scales get p = 0."""
  if not 0.0 <= max_strength <= 1.0:
    raise ValueError(f"max_strength must lie in [0, 1], got {max_strength}")
  key_strength, key_uniform = jax.random.split(key)
  num_levels = int(100 * max_strength + 1)  # as the official np.random.randint's float bound
  strengths = jax.random.randint(key_strength, (len(grids),), 0, num_levels) * jnp.float32(0.01)
  strengths = jnp.where(jnp.arange(len(grids)) < num_noisy_scales, strengths, 0.0).astype(jnp.float32)
  keys = jax.random.split(key_uniform, len(grids))
  uniforms = tuple(jax.random.uniform(k, (batch, h, w, num_bits)) for k, (h, w) in zip(keys, grids))
  return FlipNoise(strengths=strengths, uniforms=uniforms)


def flip_requant(features: jax.Array, grids: Sequence[Grid], noise: FlipNoise | None = None, *,
                 requantize: bool = True) -> tuple[jax.Array, jax.Array]:
  """features [B, H, W, d] -> (inputs (B, L - h_0 w_0, d) float, labels (B, L, d) uint8).

  `noise=None` is clean teacher forcing. Gradients do not flow (the official runs under no_grad).
  """
  features = jax.lax.stop_gradient(features)
  grids = multiscale.check_grids(grids, features.shape[-3:-1], "flip_requant")
  if noise is not None:
    if noise.strengths.shape != (len(grids),) or len(noise.uniforms) != len(grids):
      raise ValueError(f"flip noise for {noise.strengths.shape[0]} scales does not fit {len(grids)} scales")
    for (h, w), u in zip(grids, noise.uniforms):
      if u.shape != (features.shape[0], h, w, features.shape[-1]):
        raise ValueError(f"flip uniforms of shape {tuple(u.shape)} do not fit scale {(h, w)} of "
                         f"features {tuple(features.shape)}")
  full = features.shape[-3:-1]
  cum = jnp.zeros_like(features)
  labels, inputs = [], []
  for k, grid in enumerate(grids):
    _, quantized, bits = multiscale.quantize_scale(multiscale.area_resize(features - cum, grid))
    labels.append(bits)
    if noise is not None:
      flip = noise.uniforms[k] < noise.strengths[k]
      if requantize:
        quantized = multiscale.bits_to_codes(jnp.where(flip, 1 - bits, bits))
    cum = cum + multiscale.bilinear_resize(quantized, full)
    if k + 1 < len(grids):
      inputs.append(multiscale.bilinear_resize(cum, grids[k + 1]))
  if not inputs:  # a single scale: the start token is the whole input
    inputs = [jnp.zeros((features.shape[0], 0, 1, features.shape[-1]), features.dtype)]
  return multiscale.concat_scales(inputs), multiscale.concat_scales(labels)
