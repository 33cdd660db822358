"""The transformer feed-forward block: Linear -> activation -> Linear."""

from collections.abc import Callable
from typing import Literal

import jax
from flax import nnx

from bitgen.nn.linear import LinearKind, linear

Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form, as PyTorch nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation_fn(name: Activation) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class Mlp(nnx.Module):
  """[..., width] -> [..., hidden] -> activation -> [..., width]."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, activation: Activation = "gelu",
               linear_kind: LinearKind = "dense", kernel_init=nnx.initializers.lecun_normal()):
    self.activation = activation_fn(activation)
    self.up = linear(width, hidden, rngs=rngs, kind=linear_kind, axes=("embed", "mlp"),
                     kernel_init=kernel_init)
    self.down = linear(hidden, width, rngs=rngs, kind=linear_kind, axes=("mlp", "embed"),
                       kernel_init=kernel_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(self.activation(self.up(x)))
