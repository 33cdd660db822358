"""Infinity: bitwise next-scale autoregressive transformer (FoundationVision/Infinity `infinity.py`).

The sequence of a schedule with scales k = 0..K-1 is [SOS, tokens of scales 1..K-1]; token l of
scale k is predicted from positions of scales < k (position 0, the start token, predicts the 1x1
scale). The model returns logits (B, L, 2d): `logits.reshape(B, L, d, 2)[b, l, c, v]` is the logit
that bit c of token l is v.

Conditioning (the official t2i path): text features [B, S, text_channels] (flan-T5 outputs, padded)
with lengths [B] -> RMSNorm -> (a) an attentive pool -> `cond` [B, C] = the start token and the AdaLN
condition, (b) an MLP -> keys/values of every block's cross-attention. Classifier-free guidance
replaces a caption by the learned `cfg_uncond[:length]` before the norm. Class-conditional models
(`num_classes > 0`) go through the same path: label y is the one-token "caption" `class_emb[y]`.

Flags of the released models, fixed here: cosine attention, shared AdaLN, AdaLN before the head,
level embedding before the first block only, 2D RoPE normalised to the ratio's 1M grid in every
self-attention, bit labels (V = 2d), no SwiGLU, no LayerScale on the cross-attention.

Load released weights: `bitgen.convert.infinity.load_transformer(path, config)`.
"""

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.models.infinity_schedules import Schedule
from bitgen.nn import infinity_blocks as blocks
from bitgen.nn.attention import AttentionKind
from bitgen.nn.linear import LinearKind, linear
from bitgen.parallel.axes import with_axes

NUM_LEVEL_EMBEDDINGS = 15


@dataclasses.dataclass(frozen=True)
class InfinityConfig:
  """Sizes of the transformer; `num_bits` is d of the VAE (x4 with spatial patchify)."""

  embed_dim: int = 2048
  depth: int = 32
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_bits: int = 32
  text_channels: int = 2048
  text_maxlen: int = 512
  num_classes: int = 0  # > 0: class-conditional (labels as one-token captions)
  norm_eps: float = 1e-6
  spatial_patchify: bool = False  # tokens are 2x2 patches of the VAE latent (Infinity-8B)
  linear: LinearKind = "dense"
  attention: AttentionKind = "dense"

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
    if (self.embed_dim // self.num_heads) % 4:
      raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {self.embed_dim // self.num_heads}")
    if self.text_channels % self.pool_head_dim:
      raise ValueError(f"text_channels {self.text_channels} must be a multiple of {self.pool_head_dim} "
                       "(the attentive pool has text_channels / 128 heads)")
    if self.embed_dim % self.pool_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by the pool's {self.pool_heads} heads")
    if self.mlp_hidden < 1:
      raise ValueError(f"the FFN width round(embed_dim * mlp_ratio / 256) * 256 is 0 for embed_dim "
                       f"{self.embed_dim}, mlp_ratio {self.mlp_ratio}: use embed_dim * mlp_ratio >= 128")
    if self.num_classes == 0 and self.text_maxlen < 1:
      raise ValueError("a text-conditional model needs text_maxlen >= 1")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return round(self.embed_dim * self.mlp_ratio / 256) * 256

  @property
  def pool_head_dim(self) -> int:
    return 64 if self.embed_dim > 4096 else 128

  @property
  def pool_heads(self) -> int:
    return self.text_channels // self.pool_head_dim

  @property
  def max_text_len(self) -> int:
    return 1 if self.num_classes else self.text_maxlen


@flax.struct.dataclass
class Condition:
  """What every position of a batch is conditioned on.

  cond: [B, C] pooled text (start token and AdaLN input); shared_gss: [B, 1, 6, C] shared AdaLN;
  text: [B, S, C] cross-attention keys/values, of which the first text_lengths [B] are valid.
  """

  cond: jax.Array
  shared_gss: jax.Array
  text: jax.Array
  text_lengths: jax.Array

  def concat(self, other: "Condition") -> "Condition":
    """Stacks two conditions along the batch (CFG: [conditional; unconditional])."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), self, other)


def _concrete(x) -> np.ndarray | None:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


class Infinity(nnx.Module):
  def __init__(self, config: InfinityConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    width, kinds = c.embed_dim, dict(linear_kind=c.linear, attention_kind=c.attention)
    init_std = math.sqrt(1 / width / 3)
    trunc = nnx.initializers.truncated_normal(init_std)
    self.cfg_uncond = blocks.param(nnx.initializers.truncated_normal(1.2 / math.sqrt(c.text_channels)),
                                   (c.max_text_len, c.text_channels), ("length", None), rngs)
    if c.num_classes:
      self.class_emb = blocks.param(nnx.initializers.truncated_normal(1.0 / math.sqrt(c.text_channels)),
                                    (c.num_classes, c.text_channels), ("vocab", None), rngs)
    self.text_norm = blocks.RMSNorm(c.text_channels, eps=c.norm_eps, rngs=rngs)
    self.text_proj_for_sos = TextAttentivePool(c, rngs=rngs)
    self.text_proj_for_ca = TextProjection(c, rngs=rngs)
    self.pos_start = blocks.param(trunc, (width,), ("embed",), rngs)
    self.lvl_embed = nnx.Embed(NUM_LEVEL_EMBEDDINGS, width, rngs=rngs,
                               embedding_init=with_axes(trunc, (None, "embed")))
    self.word_embed = linear(c.num_bits, width, rngs=rngs, kind=c.linear, axes=(None, "embed"))
    self.shared_ada_lin = linear(width, 6 * width, rngs=rngs, kind=c.linear, axes=("embed", None))
    self.blocks = nnx.List([
        blocks.CrossAttnBlock(width, c.num_heads, c.mlp_hidden, norm_eps=c.norm_eps, rngs=rngs, **kinds)
        for _ in range(c.depth)])
    self.head_nm = blocks.AdaLNBeforeHead(width, width, norm_eps=c.norm_eps, rngs=rngs, linear_kind=c.linear)
    self.head = linear(width, 2 * c.num_bits, rngs=rngs, kind=c.linear, axes=("embed", "vocab"))

  # -- conditioning -------------------------------------------------------------------------------

  def check_condition(self, *, text: jax.Array | None = None, text_lengths: jax.Array | None = None,
                      labels: jax.Array | None = None) -> None:
    """Raises a clear error for a wrong kind of condition, bad shapes, or lengths/labels out of range.

    Values are checked where they are concrete (call it outside `jit` to check traced inputs).
    """
    c = self.config
    if c.num_classes:
      if labels is None or text is not None or text_lengths is not None:
        raise ValueError("a class-conditional Infinity takes labels=..., not text")
      values = _concrete(labels)
      if values is not None and (values.min() < 0 or values.max() >= c.num_classes):
        raise ValueError(f"class labels must lie in [0, {c.num_classes}), got {values.tolist()}")
      return
    if text is None or text_lengths is None or labels is not None:
      raise ValueError("a text-conditional Infinity takes text=... and text_lengths=..., not labels")
    if text.ndim != 3 or text.shape[-1] != c.text_channels:
      raise ValueError(f"text features must be (B, S, {c.text_channels}), got {tuple(text.shape)}")
    if jnp.shape(text_lengths) != text.shape[:1]:
      raise ValueError(f"text lengths must be ({text.shape[0]},) for {text.shape[0]} captions, "
                       f"got {tuple(jnp.shape(text_lengths))}")
    if text.shape[1] > c.max_text_len:
      raise ValueError(f"text of {text.shape[1]} tokens exceeds text_maxlen={c.max_text_len} "
                       "(the null caption cfg_uncond has that many rows)")
    values = _concrete(text_lengths)
    if values is not None and (values.min() < 1 or values.max() > text.shape[1]):
      raise ValueError(f"text lengths must lie in [1, {text.shape[1]}] (the padded text length), "
                       f"got {values.tolist()}")

  def condition(self, *, text: jax.Array | None = None, text_lengths: jax.Array | None = None,
                labels: jax.Array | None = None, drop: jax.Array | None = None) -> Condition:
    """Text features [B, S, Ct5] + lengths [B], or class labels [B]; `drop` [B] bool -> null caption."""
    self.check_condition(text=text, text_lengths=text_lengths, labels=labels)
    if self.config.num_classes:
      text = self.class_emb[...][labels][:, None, :]
      text_lengths = jnp.ones(labels.shape, jnp.int32)
    text = text.astype(self.cfg_uncond[...].dtype)  # bfloat16 weights compute in bfloat16
    text_lengths = jnp.asarray(text_lengths, jnp.int32)
    if drop is not None:
      null = self.cfg_uncond[...][:text.shape[1]]
      text = jnp.where(jnp.asarray(drop)[:, None, None], null[None], text)
    text = self.text_norm(text)
    cond = self.text_proj_for_sos(text, text_lengths)
    shared_gss = self.shared_ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 6, -1)
    return Condition(cond=cond, shared_gss=shared_gss, text=self.text_proj_for_ca(text),
                     text_lengths=text_lengths)

  # -- teacher forcing ----------------------------------------------------------------------------

  def embed(self, condition: Condition, x_wo_prefix: jax.Array, schedule: Schedule) -> jax.Array:
    """[SOS; word_embed(x)] + level embedding -> [B, L, C]."""
    sos = (condition.cond + self.pos_start[...])[:, None, :]
    x = jnp.concatenate([sos, self.word_embed(x_wo_prefix.astype(sos.dtype))], axis=1)
    return x + self.lvl_embed(jnp.asarray(schedule.scale_of_token(), jnp.int32))[None].astype(x.dtype)

  def logits(self, h: jax.Array, condition: Condition) -> jax.Array:
    """[B, T, C] hidden -> [B, T, 2d] bit logits."""
    return self.head(self.head_nm(h, condition.cond))

  def rope(self, schedule: Schedule) -> tuple[jax.Array, jax.Array]:
    cos, sin = blocks.rope2d_cos_sin(schedule.grids, schedule.rope_grid, self.config.head_dim)
    return jnp.asarray(cos), jnp.asarray(sin)

  def _check_inputs(self, x_wo_prefix: jax.Array, schedule: Schedule) -> None:
    if not isinstance(schedule, Schedule):
      raise TypeError(f"schedule must be an infinity_schedules.Schedule, got {type(schedule).__name__}")
    expected = (schedule.num_tokens - 1, self.config.num_bits)
    if x_wo_prefix.ndim != 3 or tuple(x_wo_prefix.shape[1:]) != expected:
      raise ValueError(f"x_wo_prefix must be (B, {expected[0]}, {expected[1]}) for this schedule and "
                       f"{self.config.num_bits} bits per token, got {tuple(x_wo_prefix.shape)}")

  def __call__(self, x_wo_prefix: jax.Array, schedule: Schedule, *, text: jax.Array | None = None,
               text_lengths: jax.Array | None = None, labels: jax.Array | None = None,
               drop: jax.Array | None = None) -> jax.Array:
    """Teacher forcing: x_wo_prefix (B, L-1, d) inputs of scales 1..K-1 -> logits (B, L, 2d)."""
    self._check_inputs(x_wo_prefix, schedule)
    condition = self.condition(text=text, text_lengths=text_lengths, labels=labels, drop=drop)
    return self.forward_condition(condition, x_wo_prefix, schedule)

  def forward_condition(self, condition: Condition, x_wo_prefix: jax.Array, schedule: Schedule) -> jax.Array:
    x = self.embed(condition, x_wo_prefix, schedule)
    scale = np.asarray(schedule.scale_of_token())
    mask = jnp.asarray(scale[:, None] >= scale[None, :])[None, None]  # [1, 1, L, L] block-causal
    cos, sin = self.rope(schedule)
    for block in self.blocks:
      x = block(x, condition.shared_gss, condition.text, condition.text_lengths, cos, sin, mask)
    return self.logits(x, condition)


class TextAttentivePool(nnx.Module):
  """Official `TextAttentivePool`: learned per-head queries over the normalised text -> [B, C]."""

  def __init__(self, config: InfinityConfig, *, rngs: nnx.Rngs):
    self.ca = blocks.CrossAttention(config.embed_dim, config.text_channels, config.pool_heads, rngs=rngs,
                                    pooled=True, linear_kind=config.linear, attention_kind=config.attention)

  def __call__(self, text: jax.Array, lengths: jax.Array) -> jax.Array:
    return self.ca(None, text, lengths)[:, 0]


class TextProjection(nnx.Module):
  """Text features -> cross-attention keys/values: Linear, GELU(tanh), Linear."""

  def __init__(self, config: InfinityConfig, *, rngs: nnx.Rngs):
    width = config.embed_dim
    self.fc1 = linear(config.text_channels, width, rngs=rngs, kind=config.linear, axes=(None, "mlp"))
    self.fc2 = linear(width, width, rngs=rngs, kind=config.linear, axes=("mlp", "embed"))

  def __call__(self, text: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(text), approximate=True))


def pad_packed_text(packed: np.ndarray, lengths) -> np.ndarray:
  """The official packed varlen text (sum(lengths), C) -> padded (B, max(lengths), C), zeros after."""
  lengths = np.asarray(lengths)
  if packed.ndim != 2 or packed.shape[0] != lengths.sum():
    raise ValueError(
        f"packed text {tuple(packed.shape)} does not hold sum(lengths)={int(lengths.sum())} rows")
  out = np.zeros((len(lengths), int(lengths.max()), packed.shape[1]), packed.dtype)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  for b, (start, n) in enumerate(zip(starts, lengths)):
    out[b, :n] = packed[start:start + n]
  return out


def check_vae_compatible(vae_num_bits: int, config: InfinityConfig) -> None:
  """Raises unless the VAE's bits per latent position fit the transformer's bits per token."""
  expected = vae_num_bits * (4 if config.spatial_patchify else 1)
  if expected != config.num_bits:
    patch = " x 4 (2x2 spatial patchify)" if config.spatial_patchify else ""
    raise ValueError(f"the VAE gives {vae_num_bits}{patch} = {expected} bits per token but the "
                     f"transformer predicts {config.num_bits}; pair models of the same bit width")
