"""Exponential moving average of parameters (timm `ModelEmaV2`, as the official trainer's --use-ema).

ema <- decay * ema + (1 - decay) * params after every optimizer step, starting from a copy of the
initial parameters; the official default decay is 0.999.
"""

import jax
import jax.numpy as jnp


def ema_update(ema_params, params, decay: float | jax.Array):
  """One EMA step over matching pytrees; non-float leaves are copied."""

  def update(ema, value):
    if not jnp.issubdtype(value.dtype, jnp.floating):
      return value
    return (decay * ema + (1.0 - decay) * value).astype(ema.dtype)

  return jax.tree.map(update, ema_params, params)
