"""Denoiser of Binary Latent Diffusion: the official `TransformerBD`.

Noisy bits x_t (B, L, C) become tokens (2 x_t - 1) @ tok_emb plus a learned position table
(initialised with 2D sin-cos, MAE convention); one time token (sinusoidal embedding of
(t - 1) / time_scale_steps * 4000 -> Linear -> SiLU -> Linear) and, for class-conditional models,
one class token are appended; pre-LN blocks with layer scale; the head reads the L bit tokens
through a final LayerNorm and predicts, per bit, the logit that x_0 differs from x_t
("flip" parameterisation; see `bitgen.sample.binary_diffusion`).

Build: `Denoiser(Config(...), rngs=nnx.Rngs(0))`; load official weights with
`bitgen.convert.bld.load_denoiser`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.nn.linear import linear
from bitgen.nn.mlp import Mlp
from bitgen.nn.norms import layer_norm
from bitgen.nn.transformer import BlockConfig, SelfAttention
from bitgen.parallel.axes import with_axes

TIME_RESCALE = 4000.0


@dataclasses.dataclass(frozen=True)
class Config:
  num_bits: int = 64            # official `codebook_size`: bits per latent position
  latent_size: int = 16         # the latent grid is latent_size x latent_size (block_size = its square)
  width: int = 768              # official `bert_n_emb`
  heads: int = 12
  depth: int = 24
  num_classes: int = 0          # 0: unconditional; > 0: a class token (official 'imagenet' datasets)
  # The time embedding divides t - 1 by this: the official `H.sample_steps` (= total_steps in the
  # released runs). It belongs to the trained model, not to the number of sampling steps.
  time_scale_steps: int = 64
  mlp_ratio: float = 4.0
  linear_kind: str = "dense"
  attention_kind: str = "dense"

  def __post_init__(self):
    if self.width % 4:
      raise ValueError(f"width must be a multiple of 4 (2D sin-cos positions), got {self.width}")

  @property
  def num_positions(self) -> int:
    return self.latent_size ** 2

  @property
  def block(self) -> BlockConfig:
    return BlockConfig(width=self.width, heads=self.heads, mlp_ratio=self.mlp_ratio,
                       activation="gelu", attention=self.attention_kind, linear=self.linear_kind)


def sincos_positions_2d(width: int, grid: int) -> np.ndarray:
  """(grid*grid, width) float32, row-major positions; channels [0, width/2) encode the column,
  [width/2, width) the row, each as [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-i / (width/4))."""
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing="ij")

  def encode(pos):
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def sinusoidal_time(t: jax.Array, width: int, time_scale_steps: int) -> jax.Array:
  """(B,) int diffusion steps 1..T -> (B, width): cat(sin(s f), cos(s f)), s = (t-1)/steps*4000."""
  half = width // 2
  s = (t - 1).astype(jnp.float32) / jnp.float32(time_scale_steps) * jnp.float32(TIME_RESCALE)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(10000) / (half - 1)))
  args = s[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeToken(nnx.Module):
  """The official `AdaTkn_Time`: sinusoidal(t) -> l0 -> SiLU -> linear."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    self.l0 = linear(config.width, config.width, rngs=rngs, kind=config.linear_kind,
                     axes=("embed", "mlp"))
    self.linear = linear(config.width, config.width, rngs=rngs, kind=config.linear_kind,
                         axes=("mlp", "embed"))

  def __call__(self, t: jax.Array) -> jax.Array:
    emb = sinusoidal_time(t, self.config.width, self.config.time_scale_steps)
    return self.linear(jax.nn.silu(self.l0(emb)))


class LayerScaleBlock(nnx.Module):
  """x + gamma_1 * attn(ln_1(x)), then x + gamma_2 * mlp(ln_2(x)) (the official `Block`)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    block = config.block
    self.ln_1 = layer_norm(block.width, eps=block.norm_eps, rngs=rngs)
    self.attn = SelfAttention(block, rngs=rngs)
    self.ln_2 = layer_norm(block.width, eps=block.norm_eps, rngs=rngs)
    self.mlp = Mlp(block.width, block.mlp_width, rngs=rngs, activation=block.activation,
                   linear_kind=block.linear)
    scale = lambda: nnx.Param(with_axes(nnx.initializers.ones_init(), ("embed",))(
        rngs.params(), (block.width,)))
    self.gamma_1, self.gamma_2 = scale(), scale()

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.gamma_1[...] * self.attn(self.ln_1(x), mask=mask)
    return x + self.gamma_2[...] * self.mlp(self.ln_2(x))


class Denoiser(nnx.Module):
  """(x_t bits (B, L, C), t (B,), labels) -> (B, L, C) flip logits."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.tok_emb = linear(c.num_bits, c.width, rngs=rngs, kind=c.linear_kind, use_bias=False,
                          axes=(None, "embed"), kernel_init=nnx.initializers.normal(0.02))
    self.pos_emb = nnx.Param(with_axes(
        lambda *_: jnp.asarray(sincos_positions_2d(c.width, c.latent_size)), ("length", "embed"))(
            rngs.params(), (c.num_positions, c.width)))
    self.time_token = TimeToken(c, rngs=rngs)
    self.cls_emb = (
        nnx.Embed(c.num_classes, c.width, rngs=rngs,
                  embedding_init=with_axes(nnx.initializers.normal(0.02), ("vocab", "embed")))
        if c.num_classes else None)
    self.blocks = nnx.List([LayerScaleBlock(c, rngs=rngs) for _ in range(c.depth)])
    self.ln_f = layer_norm(c.width, rngs=rngs)
    self.head = linear(c.width, c.num_bits, rngs=rngs, kind=c.linear_kind, axes=("embed", None))

  def embed(self, bits: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """The sequence entering block 0: [bit tokens + positions, time token, class token?]."""
    c = self.config
    if bits.ndim != 3 or bits.shape[1:] != (c.num_positions, c.num_bits):
      raise ValueError(
          f"x_t must be (B, {c.num_positions}, {c.num_bits}) bits (latent {c.latent_size}x"
          f"{c.latent_size}, {c.num_bits} bits per position), got {bits.shape}")
    if t.shape != bits.shape[:1]:
      raise ValueError(f"t must be ({bits.shape[0]},) diffusion steps, got shape {t.shape}")
    if labels is not None:
      if self.cls_emb is None:
        raise ValueError("labels given, but this denoiser is unconditional (num_classes=0)")
      if labels.shape != bits.shape[:1]:
        raise ValueError(f"labels must be ({bits.shape[0]},) class ids, got shape {labels.shape}")
    # [B, L, D]
    x = self.tok_emb(2 * bits.astype(jnp.float32) - 1) + self.pos_emb[...][None]
    tokens = [x, self.time_token(t)[:, None]]
    if labels is not None:
      tokens.append(self.cls_emb(labels)[:, None])
    return jnp.concatenate(tokens, axis=1)

  def __call__(
      self, bits: jax.Array, t: jax.Array, labels: jax.Array | None = None, *,
      drop_labels: jax.Array | None = None,
  ) -> jax.Array:
    """bits (B, L, C) {0,1}; t (B,) int steps 1..T; labels (B,) int or None (no class token).

    drop_labels (B,) bool: where True the class token is masked out of attention, which equals
    the reference's label=None branch for that sample; this lets classifier-free guidance run the
    conditional and unconditional passes as one batch.
    """
    x = self.embed(bits, t, labels)
    mask = None
    if drop_labels is not None:
      if labels is None:
        raise ValueError("drop_labels needs labels")
      keep = jnp.concatenate(
          [jnp.ones((x.shape[0], x.shape[1] - 1), bool), ~drop_labels.astype(bool)[:, None]], axis=1)
      mask = keep[:, None, None, :]  # [B, 1, 1, S] over keys
    for block in self.blocks:
      x = block(x, mask=mask)
    return self.head(self.ln_f(x[:, :self.config.num_positions]))
