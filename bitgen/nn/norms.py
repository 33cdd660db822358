"""Normalisation layers with logical axis names on their parameters."""

from flax import nnx

from bitgen.parallel.axes import with_axes


def layer_norm(width: int, *, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.LayerNorm:
  """LayerNorm over the last axis, PyTorch numerics (eps 1e-5, two-pass variance)."""
  return nnx.LayerNorm(
      width, epsilon=eps, use_fast_variance=False, rngs=rngs,
      scale_init=with_axes(nnx.initializers.ones_init(), ("norm",)),
      bias_init=with_axes(nnx.initializers.zeros_init(), ("norm",)))
