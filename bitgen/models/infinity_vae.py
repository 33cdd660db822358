"""Infinity's BSQ VAE: the FLUX-style CNN encoder/decoder around multi-scale residual BSQ.

Official: FoundationVision/Infinity `infinity/models/bsq_vae/flux_vqgan.py::AutoEncoder` as built by
`vae.py::vae_model` (2D convs, GroupNorm(32, eps 1e-6), no attention blocks, nearest x2 upsampling +
3x3 conv, right/bottom zero padding before each stride-2 conv). Images are NHWC in [-1, 1]; latents
[B, h, w, d] with d = `codebook_dim` bits per token; the quantizer is the pure function
`bitgen.quantizers.multiscale.multiscale_quantize`.

Attribute names mirror the official module tree (`encoder.down[i].block[j].conv1`, `decoder.up[i]`
with level 0 at full resolution, run last), so `bitgen.convert.infinity` maps keys by name.

Load a released checkpoint: `bitgen.convert.infinity.load_vae(path, get_config("d32"))`.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.models import infinity_schedules
from bitgen.parallel.axes import with_axes
from bitgen.quantizers import multiscale
from bitgen.quantizers.base import QuantizerOutput

# PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_TORCH_CONV_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class InfinityVAEConfig:
  """Official `vae_model` arguments; the defaults are the released d32 tokenizer."""

  codebook_dim: int = 32
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
  num_res_blocks: int = 2
  patch_size: int = 16
  image_channels: int = 3

  def __post_init__(self):
    object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
    if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
      raise ValueError(f"patch_size must be a power of 2, got {self.patch_size}")
    if self.num_downsamples > len(self.channel_mult) - 1:
      raise ValueError(f"patch_size {self.patch_size} needs {self.num_downsamples} downsamples but "
                       f"channel_mult {self.channel_mult} has only {len(self.channel_mult) - 1}")
    for mult in self.channel_mult:
      _num_groups(self.base_channels * mult)
    if self.codebook_dim < 1:
      raise ValueError(f"codebook_dim must be >= 1, got {self.codebook_dim}")

  @property
  def num_downsamples(self) -> int:
    return int(math.log2(self.patch_size))


def _num_groups(channels: int) -> int:
  """Official `Normalize`: 32 groups, else 24, else unsupported."""
  for groups in (32, 24):
    if channels % groups == 0:
      return groups
  raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {channels}")


def _conv(c_in: int, c_out: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nnx.Conv(
      c_in, c_out, (kernel, kernel), strides=stride, padding=padding, rngs=rngs,
      kernel_init=with_axes(_TORCH_CONV_INIT, (None, None, "conv_in", "conv_out")),
      bias_init=with_axes(nnx.initializers.zeros_init(), ("conv_out",)))


def _group_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(
      channels, num_groups=_num_groups(channels), epsilon=1e-6, use_fast_variance=False, rngs=rngs,
      scale_init=with_axes(nnx.initializers.ones_init(), ("norm",)),
      bias_init=with_axes(nnx.initializers.zeros_init(), ("norm",)))


class ResnetBlock(nnx.Module):
  def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
    self.norm1 = _group_norm(c_in, rngs=rngs)
    self.conv1 = _conv(c_in, c_out, 3, rngs=rngs)
    self.norm2 = _group_norm(c_out, rngs=rngs)
    self.conv2 = _conv(c_out, c_out, 3, rngs=rngs)
    self.nin_shortcut = _conv(c_in, c_out, 1, rngs=rngs) if c_in != c_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class Downsample(nnx.Module):
  """Zero-pad right and bottom by 1, then a 3x3 stride-2 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs=rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2))


class Level(nnx.Module):
  """One resolution level: residual blocks, then an optional resampling."""

  def __init__(self, blocks: list[ResnetBlock], resample: nnx.Module | None, resample_name: str):
    self.block = nnx.List(blocks)
    self.resample_name = resample_name
    setattr(self, resample_name, resample)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.block:
      x = block(x)
    resample = getattr(self, self.resample_name)
    return x if resample is None else resample(x)


class Mid(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, rngs=rngs)
    self.block_2 = ResnetBlock(channels, channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.block_1(x))


class Encoder(nnx.Module):
  """[B, H, W, 3] -> [B, H/p, W/p, d] continuous features."""

  def __init__(self, config: InfinityVAEConfig, *, rngs: nnx.Rngs):
    ch, mult = config.base_channels, config.channel_mult
    self.conv_in = _conv(config.image_channels, ch, 3, rngs=rngs)
    levels, block_in = [], ch
    for i, m in enumerate(mult):
      blocks = []
      for _ in range(config.num_res_blocks):
        blocks.append(ResnetBlock(block_in, ch * m, rngs=rngs))
        block_in = ch * m
      down = Downsample(block_in, rngs=rngs) if i < config.num_downsamples else None
      levels.append(Level(blocks, down, "downsample"))
    self.down = nnx.List(levels)
    self.mid = Mid(block_in, rngs=rngs)
    self.norm_out = _group_norm(block_in, rngs=rngs)
    self.conv_out = _conv(block_in, config.codebook_dim, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """[B, h, w, d] latents -> [B, h*p, w*p, 3] unclamped image."""

  def __init__(self, config: InfinityVAEConfig, *, rngs: nnx.Rngs):
    ch, mult = config.base_channels, config.channel_mult
    block_in = ch * mult[-1]
    self.conv_in = _conv(config.codebook_dim, block_in, 3, rngs=rngs)
    self.mid = Mid(block_in, rngs=rngs)
    levels = [None] * len(mult)
    for i in reversed(range(len(mult))):
      blocks = []
      for _ in range(config.num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, ch * mult[i], rngs=rngs))
        block_in = ch * mult[i]
      up = Upsample(block_in, rngs=rngs) if 1 <= i <= config.num_downsamples else None
      levels[i] = Level(blocks, up, "upsample")
    self.up = nnx.List(levels)  # up[0] is full resolution and runs last
    self.norm_out = _group_norm(block_in, rngs=rngs)
    self.conv_out = _conv(block_in, config.image_channels, 3, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class InfinityVAE(nnx.Module):
  """Encoder + multi-scale residual BSQ + decoder."""

  def __init__(self, config: InfinityVAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)

  @property
  def num_bits(self) -> int:
    return self.config.codebook_dim

  def _check_images(self, x: jax.Array) -> None:
    stride = self.config.patch_size
    if x.ndim != 4 or x.shape[-1] != self.config.image_channels:
      raise ValueError(f"InfinityVAE expects NHWC images (B, H, W, {self.config.image_channels}), "
                       f"got shape {tuple(x.shape)}")
    if x.shape[1] % stride or x.shape[2] % stride:
      raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the VAE stride {stride}")

  def encode_features(self, x: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> continuous features [B, H/p, W/p, d]."""
    self._check_images(x)
    return self.encoder(x)

  def encode(self, x: jax.Array, grids: Sequence[tuple[int, int]] | None = None,
             **loss_kwargs) -> QuantizerOutput:
    """Images -> multi-scale quantizer output (quantized latent, (B, L, d) bit labels, loss).

    grids: the scales (h, w), ending at the latent grid; default: the official prefix reaching it.
    """
    features = self.encode_features(x)
    if grids is None:
      grids = infinity_schedules.grids_for_latent(*features.shape[1:3])
    return multiscale.multiscale_quantize(features, grids, **loss_kwargs)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents [B, h, w, d] -> images clipped to [-1, 1] (official `decode`)."""
    if z.ndim != 4 or z.shape[-1] != self.num_bits:
      raise ValueError(f"InfinityVAE.decode expects latents (B, h, w, {self.num_bits}), got {tuple(z.shape)}")
    return jnp.clip(self.decoder(z), -1.0, 1.0)

  def decode_bits(self, bits_per_scale: Sequence[jax.Array]) -> jax.Array:
    """Per-scale bits [B, h_k, w_k, d] (last = full grid) -> images in [-1, 1]."""
    for bits in bits_per_scale:
      if bits.ndim != 4 or bits.shape[-1] != self.num_bits:
        raise ValueError(f"InfinityVAE.decode_bits expects bits (B, h, w, {self.num_bits}) per scale, "
                         f"got {tuple(bits.shape)}")
    latent_hw = bits_per_scale[-1].shape[1:3]
    return self.decode(multiscale.codes_from_bits(bits_per_scale, latent_hw))

  def __call__(self, x: jax.Array, grids: Sequence[tuple[int, int]] | None = None, **loss_kwargs):
    """Training forward: (unclamped reconstruction [B, H, W, 3], quantizer output)."""
    out = self.encode(x, grids, **loss_kwargs)
    return self.decoder(out.quantized), out
