"""Pre-LN transformer: multi-head self-attention block and a stack of them.

Projections go through `bitgen.nn.linear.linear(kind=...)` and the attention math through
`bitgen.nn.attention.attention(kind=...)`, so a new linear or attention kind reaches every model
built from these blocks without touching them. Activations are [B, T, width].
"""

import dataclasses

import jax
from flax import nnx

from bitgen.nn.attention import AttentionKind, attention
from bitgen.nn.linear import LinearKind, linear
from bitgen.nn.mlp import Activation, Mlp
from bitgen.nn.norms import layer_norm


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Hyper-parameters shared by every block of a stack."""

  width: int
  heads: int
  mlp_ratio: float = 4.0
  activation: Activation = "gelu"
  attention: AttentionKind = "dense"
  linear: LinearKind = "dense"
  norm_eps: float = 1e-5

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def mlp_width(self) -> int:
    return int(self.width * self.mlp_ratio)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with separate q, k, v and output projections."""

  def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs, kernel_init=nnx.initializers.lecun_normal()):
    self.config = config
    width, kind = config.width, config.linear
    self.query = linear(width, width, rngs=rngs, kind=kind, axes=("embed", "heads"), kernel_init=kernel_init)
    self.key = linear(width, width, rngs=rngs, kind=kind, axes=("embed", "heads"), kernel_init=kernel_init)
    self.value = linear(width, width, rngs=rngs, kind=kind, axes=("embed", "heads"), kernel_init=kernel_init)
    self.out = linear(width, width, rngs=rngs, kind=kind, axes=("heads", "embed"), kernel_init=kernel_init)

  def __call__(self, x: jax.Array, *, bias: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    split = lambda t: t.reshape(*t.shape[:-1], self.config.heads, self.config.head_dim)
    # [B, T, N, H]
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    # [B, T, N, H]
    y = attention(q, k, v, bias=bias, mask=mask, kind=self.config.attention)
    return self.out(y.reshape(*x.shape[:-1], self.config.width))


class TransformerBlock(nnx.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs, kernel_init=nnx.initializers.lecun_normal()):
    self.ln_1 = layer_norm(config.width, eps=config.norm_eps, rngs=rngs)
    self.attn = SelfAttention(config, rngs=rngs, kernel_init=kernel_init)
    self.ln_2 = layer_norm(config.width, eps=config.norm_eps, rngs=rngs)
    self.mlp = Mlp(config.width, config.mlp_width, rngs=rngs, activation=config.activation,
                   linear_kind=config.linear, kernel_init=kernel_init)

  def __call__(self, x: jax.Array, *, bias: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.ln_1(x), bias=bias, mask=mask)
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  """`depth` pre-LN blocks applied in order."""

  def __init__(self, config: BlockConfig, depth: int, *, rngs: nnx.Rngs,
               kernel_init=nnx.initializers.lecun_normal()):
    self.blocks = nnx.List(
        [TransformerBlock(config, rngs=rngs, kernel_init=kernel_init) for _ in range(depth)])

  def __call__(self, x: jax.Array, *, bias: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    for block in self.blocks:
      x = block(x, bias=bias, mask=mask)
    return x
