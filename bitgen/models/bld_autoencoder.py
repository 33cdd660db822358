"""Binary autoencoder of Binary Latent Diffusion (Wang et al. 2023, ZeWang95/BinaryLatentDiffusion).

A VQGAN-style CNN (taming-transformers layout, GroupNorm(32, eps 1e-6), SiLU, attention at the
listed resolutions and at the lowest one) whose latent is a grid of bits: a 1x1 projection and a
sigmoid give Bernoulli probabilities (`bitgen.quantizers.bernoulli`), and the decoder input is a
linear map of the bits (`code_embed`, the official `quantize.embed.weight`).

Images are NHWC float32 in [-1, 1]; bits are (B, h, w, C) uint8 with the bit axis last.
Build: `BinaryAutoencoder(Config(...), rngs=nnx.Rngs(0))`; load official weights with
`bitgen.convert.bld.load_autoencoder`. Blocks are kept in the official order (`blocks[i]` is the
reference's `blocks.{i}`) so the converter maps them one to one.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.nn.attention import attention
from bitgen.nn.linear import linear
from bitgen.parallel.axes import with_axes
from bitgen.quantizers.base import QuantizerOutput
from bitgen.quantizers.bernoulli import bernoulli_quantize

NORM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class Config:
  image_size: int = 256
  in_channels: int = 3
  base_channels: int = 128            # official `nf`
  channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2             # official `res_blocks`
  attn_resolutions: tuple[int, ...] = (16,)
  emb_dim: int = 256                  # encoder output width = decoder input width
  num_bits: int = 64                  # official `codebook_size`: bits per latent position
  decoder_res_mult: float = 1.0       # official `gen_mul`: decoder has int(num_res_blocks * this)
  norm_first: bool = True             # GroupNorm on the decoder input (the released AEs)
  code_weight: float = 0.0            # weight of the quantizer's codebook loss
  linear_kind: str = "dense"
  attention_kind: str = "dense"

  def __post_init__(self):
    for name in ("channel_mult", "attn_resolutions"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    down = 2 ** (len(self.channel_mult) - 1)
    if self.image_size % down:
      raise ValueError(
          f"image_size={self.image_size} must be divisible by {down} (2^(len(channel_mult)-1))")
    widths = {self.base_channels * m for m in self.channel_mult}
    if any(w % NORM_GROUPS for w in widths):
      raise ValueError(f"channel widths {sorted(widths)} must be multiples of {NORM_GROUPS} (GroupNorm)")
    if self.norm_first and self.emb_dim % NORM_GROUPS:
      raise ValueError(f"norm_first needs emb_dim % {NORM_GROUPS} == 0, got emb_dim={self.emb_dim}")

  @property
  def latent_size(self) -> int:
    return self.image_size // 2 ** (len(self.channel_mult) - 1)


def conv3x3(in_ch: int, out_ch: int, *, rngs: nnx.Rngs, stride: int = 1) -> nnx.Conv:
  """3x3 conv, torch padding 1; stride 2 pads right/bottom only (the reference's Downsample)."""
  padding = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))
  return nnx.Conv(
      in_ch, out_ch, (3, 3), strides=stride, padding=padding, rngs=rngs,
      kernel_init=with_axes(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
      bias_init=with_axes(nnx.initializers.zeros_init(), ("conv_out",)))


def group_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(
      channels, num_groups=NORM_GROUPS, epsilon=1e-6, use_fast_variance=False, rngs=rngs,
      scale_init=with_axes(nnx.initializers.ones_init(), ("norm",)),
      bias_init=with_axes(nnx.initializers.zeros_init(), ("norm",)))


class ResBlock(nnx.Module):
  """norm -> SiLU -> conv -> norm -> SiLU -> conv, plus a 1x1 shortcut when widths differ."""

  def __init__(self, in_ch: int, out_ch: int, *, config: Config, rngs: nnx.Rngs):
    self.norm1 = group_norm(in_ch, rngs=rngs)
    self.conv1 = conv3x3(in_ch, out_ch, rngs=rngs)
    self.norm2 = group_norm(out_ch, rngs=rngs)
    self.conv2 = conv3x3(out_ch, out_ch, rngs=rngs)
    self.shortcut = (
        linear(in_ch, out_ch, rngs=rngs, kind=config.linear_kind, axes=("conv_in", "conv_out"))
        if in_ch != out_ch else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return h + (x if self.shortcut is None else self.shortcut(x))


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions of the feature map (1x1 q/k/v/out)."""

  def __init__(self, channels: int, *, config: Config, rngs: nnx.Rngs):
    self.norm = group_norm(channels, rngs=rngs)
    proj = lambda: linear(
        channels, channels, rngs=rngs, kind=config.linear_kind, axes=("conv_in", "conv_out"))
    self.q, self.k, self.v, self.proj_out = proj(), proj(), proj(), proj()
    self.kind = config.attention_kind

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.norm(x).reshape(b, h * w, 1, c)
    # [B, HW, 1, C]
    y = attention(self.q(y), self.k(y), self.v(y), kind=self.kind)
    return x + self.proj_out(y.reshape(b, h, w, c))


class Downsample(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, channels, rngs=rngs, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, x2
    return self.conv(x)


class Encoder(nnx.Module):
  """(B, S, S, 3) -> (B, S/2^(n-1), S/2^(n-1), emb_dim)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    blocks = [conv3x3(c.in_channels, c.base_channels, rngs=rngs)]
    res = c.image_size
    ch = c.base_channels
    for level, mult in enumerate(c.channel_mult):
      for _ in range(c.num_res_blocks):
        blocks.append(ResBlock(ch, c.base_channels * mult, config=c, rngs=rngs))
        ch = c.base_channels * mult
        if res in c.attn_resolutions:
          blocks.append(AttnBlock(ch, config=c, rngs=rngs))
      if level != len(c.channel_mult) - 1:
        blocks.append(Downsample(ch, rngs=rngs))
        res //= 2
    blocks += [ResBlock(ch, ch, config=c, rngs=rngs), AttnBlock(ch, config=c, rngs=rngs),
               ResBlock(ch, ch, config=c, rngs=rngs)]
    # The reference has no activation between this norm and the output conv.
    blocks += [group_norm(ch, rngs=rngs), conv3x3(ch, c.emb_dim, rngs=rngs)]
    self.blocks = nnx.List(blocks)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x)
    return x


class Decoder(nnx.Module):
  """The reference's `Generator`: (B, h, w, emb_dim) -> (B, S, S, 3), not clamped."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    num_res_blocks = int(c.num_res_blocks * c.decoder_res_mult)
    ch = c.base_channels * c.channel_mult[-1]
    res = c.latent_size
    blocks = [group_norm(c.emb_dim, rngs=rngs)] if c.norm_first else []
    blocks += [conv3x3(c.emb_dim, ch, rngs=rngs)]
    blocks += [ResBlock(ch, ch, config=c, rngs=rngs), AttnBlock(ch, config=c, rngs=rngs),
               ResBlock(ch, ch, config=c, rngs=rngs)]
    for level in reversed(range(len(c.channel_mult))):
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(ch, c.base_channels * c.channel_mult[level], config=c, rngs=rngs))
        ch = c.base_channels * c.channel_mult[level]
        if res in c.attn_resolutions:
          blocks.append(AttnBlock(ch, config=c, rngs=rngs))
      if level != 0:
        blocks.append(Upsample(ch, rngs=rngs))
        res *= 2
    blocks += [group_norm(ch, rngs=rngs), conv3x3(ch, c.in_channels, rngs=rngs)]
    self.blocks = nnx.List(blocks)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x)
    return x


class BinaryAutoencoder(nnx.Module):
  """Encoder -> Bernoulli bits -> linear code embedding -> decoder."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.quant_proj = linear(
        config.emb_dim, config.num_bits, rngs=rngs, kind=config.linear_kind,
        axes=("conv_in", "conv_out"))
    # The official `quantize.embed.weight` (num_bits, emb_dim): the decoder input is bits @ this.
    self.code_embed = linear(
        config.num_bits, config.emb_dim, rngs=rngs, kind=config.linear_kind, use_bias=False,
        axes=(None, "embed"))
    self.decoder = Decoder(config, rngs=rngs)

  def _check_images(self, images: jax.Array) -> None:
    c = self.config
    want = (c.image_size, c.image_size, c.in_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"images must be NHWC (B, {want[0]}, {want[1]}, {want[2]}), got {images.shape}")

  def encode_features(self, images: jax.Array) -> jax.Array:
    """(B, S, S, 3) -> (B, h, w, emb_dim), the input of the quantizer projection."""
    self._check_images(images)
    return self.encoder(images)

  def encode_probs(self, images: jax.Array) -> jax.Array:
    """(B, S, S, 3) -> (B, h, w, num_bits) Bernoulli probabilities."""
    return jax.nn.sigmoid(self.quant_proj(self.encode_features(images)))

  def quantize(self, probs: jax.Array, *, key: jax.Array | None = None) -> QuantizerOutput:
    """Thresholds (key=None) or samples the bits; see `bernoulli_quantize`."""
    return bernoulli_quantize(probs, key=key, code_weight=self.config.code_weight)

  def encode(self, images: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """(B, S, S, 3) -> (B, h, w, num_bits) uint8 bits."""
    return self.quantize(self.encode_probs(images), key=key).codes

  def embed_bits(self, bits: jax.Array) -> jax.Array:
    """(B, h, w, num_bits) {0,1} (or STE floats) -> (B, h, w, emb_dim) decoder input."""
    if bits.shape[-1] != self.config.num_bits:
      raise ValueError(
          f"bits have {bits.shape[-1]} channels but this autoencoder uses num_bits="
          f"{self.config.num_bits}")
    return self.code_embed(bits.astype(jnp.float32))

  def decode(self, bits: jax.Array) -> jax.Array:
    """(B, h, w, num_bits) bits -> (B, S, S, 3) images (not clamped)."""
    h = self.config.latent_size
    if bits.ndim != 4 or bits.shape[1:3] != (h, h):
      raise ValueError(f"bits must be (B, {h}, {h}, {self.config.num_bits}), got {bits.shape}")
    return self.decoder(self.embed_bits(bits))

  def __call__(
      self, images: jax.Array, *, key: jax.Array | None = None
  ) -> tuple[jax.Array, QuantizerOutput]:
    """Reconstruction and quantizer output; `key` samples bits (training), None thresholds."""
    out = self.quantize(self.encode_probs(images), key=key)
    return self.decoder(self.embed_bits(out.quantized)), out
