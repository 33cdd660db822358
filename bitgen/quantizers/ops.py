"""Small numerical pieces the quantizers share, with the official (PyTorch) numerics."""

import jax
import jax.numpy as jnp

L2_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = L2_EPS) -> jax.Array:
  """`x / max(||x||, eps)` like `torch.nn.functional.normalize`, gradient included.

  An all-zero vector stays zero and, as in PyTorch, gets the gradient `1 / eps` (the clamped norm
  is a constant there), never NaN.
  """
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return x / jnp.maximum(norm, eps)


def straight_through(x: jax.Array, value: jax.Array) -> jax.Array:
  """`x + stop_gradient(value - x)`: forward `value` (up to float rounding), gradient identity."""
  return x + jax.lax.stop_gradient(value - x)


def sign_values(x: jax.Array) -> jax.Array:
  """+1 where x > 0, else -1 (so sign(+-0) = -1), in x's dtype."""
  return jnp.where(x > 0, jnp.ones_like(x), -jnp.ones_like(x))


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32 (or wider): the quantizers' losses and thresholds are computed there."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_last_dim(x: jax.Array, dim: int, who: str) -> None:
  """One clear error for a wrong channel count or a non-float input."""
  if x.ndim < 1 or x.shape[-1] != dim:
    raise ValueError(f"{who} expects inputs of shape (..., {dim}), got {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{who} expects floating-point inputs, got {x.dtype}")
