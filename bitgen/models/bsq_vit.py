"""BSQ-ViT tokenizer (Zhao, Xiong, Krähenbühl 2024): ViT encoder -> binary spherical quantizer -> ViT decoder.

The official `VITBSQModel` (github.com/zhaoyue-zephyrus/bsq-vit, `transcoder/models/bsqvit.py`):

  images [B, S, S, 3] in [-1, 1]
  -> patchify (p x p patches, channel-major pixels) -> Linear, no bias ("conv1")
  -> + learned positions -> LayerNorm -> pre-LN transformer blocks -> LayerNorm    (encoder)
  -> Linear to the quantizer's `dim` -> L2 normalise -> quantizer (BSQ: sign(u) / sqrt(L))
  -> Linear back to width -> + learned positions -> LayerNorm -> blocks -> LayerNorm (decoder)
  -> Linear(width, decoder_ffn_dim) -> Tanh -> Linear to p * p * 3 pixels ("conv_out") -> unpatchify
  -> clamp to [-1, 1] (the forward pass only; `decode` returns the unclamped output).

The quantizer comes from `bitgen.quantizers.build(config.quantizer)` (BSQ, or LFQ / FSQ baselines).
Weights start like the official init (normal(0.02) kernels in the ViTs, PyTorch's default Linear init
for the quantizer projections and the output biases). Load official weights with
`bitgen.convert.bsq_vit.load_bsq_vit(path, config)`.

Input checks: shape, channel count and dtype always; the [-1, 1] range only where the images are
concrete (eager calls), not under `jax.jit`, where values are unknown at trace time.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen import configlib
from bitgen import quantizers
from bitgen.nn.attention import AttentionKind
from bitgen.nn.linear import LinearKind, linear
from bitgen.nn.norms import layer_norm
from bitgen.nn.patches import patchify, unpatchify
from bitgen.nn.transformer import BlockConfig, Transformer
from bitgen.parallel.axes import with_axes
from bitgen.quantizers.base import QuantizerOutput
from bitgen.quantizers.ops import l2_normalize

# Images may leave [-1, 1] by this much (resampling overshoot) before `encode` rejects them.
RANGE_TOLERANCE = 1e-2
INIT_STDDEV = 0.02  # official trunc_normal_(std=0.02) (truncated at +-2, i.e. +-100 std: a plain normal)


@dataclasses.dataclass(frozen=True)
class Config:
  """A BSQ-ViT; `quantizer` is the dict `bitgen.quantizers.build` takes (e.g. name "bsq")."""

  image_size: int
  patch_size: int
  width: int
  depth: int  # blocks in the encoder and in the decoder
  heads: int
  quantizer: Mapping[str, Any]
  mlp_ratio: float = 4.0
  decoder_ffn_dim: int = 3072  # official `dim_ffn_output`
  channels: int = 3
  l2_normalize: bool = True  # official `l2_norm`: unit-norm latents into the quantizer
  attention: AttentionKind = "dense"  # the transformer blocks' attention kind
  linear: LinearKind = "dense"  # the transformer blocks' projection kind; the embeddings stay dense

  def __post_init__(self):
    for name in ("image_size", "patch_size", "width", "depth", "heads", "decoder_ffn_dim", "channels"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BSQ-ViT config {name} must be a positive integer, got {value!r}")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"BSQ-ViT patch_size {self.patch_size} does not divide image_size {self.image_size}")
    if self.width % self.heads:
      raise ValueError(f"BSQ-ViT width {self.width} is not divisible by heads {self.heads}")
    quantizer = self.quantizer.to_dict() if hasattr(self.quantizer, "to_dict") else dict(self.quantizer)
    object.__setattr__(self, "quantizer", quantizer)

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size // self.patch_size, self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.channels * self.patch_size ** 2

  def block_config(self) -> BlockConfig:
    return BlockConfig(self.width, self.heads, self.mlp_ratio, activation="gelu",
                       attention=self.attention, linear=self.linear, norm_eps=1e-5)


def _torch_linear_init(fan_in: int) -> dict[str, Any]:
  """PyTorch's default nn.Linear init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return dict(kernel_init=uniform, bias_init=uniform)


def _positions(num_tokens: int, width: int, rngs: nnx.Rngs) -> nnx.Param:
  init = with_axes(nnx.initializers.normal(INIT_STDDEV), ("length", "embed"))
  return nnx.Param(init(rngs.params(), (num_tokens, width), jnp.float32))


class Encoder(nnx.Module):
  """[B, S, S, C] images -> [B, T, width] tokens (official `TransformerEncoder`)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.patch_size = config.patch_size
    normal = nnx.initializers.normal(INIT_STDDEV)
    self.patch_embed = linear(config.patch_dim, config.width, rngs=rngs, use_bias=False,
                              axes=(None, "embed"), kernel_init=normal)
    self.position_embedding = _positions(config.num_tokens, config.width, rngs)
    self.ln_pre = layer_norm(config.width, rngs=rngs)
    self.transformer = Transformer(config.block_config(), config.depth, rngs=rngs, kernel_init=normal)
    self.ln_post = layer_norm(config.width, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    tokens = self.patch_embed(patchify(images, self.patch_size))
    x = self.ln_pre(tokens + self.position_embedding[...])
    return self.ln_post(self.transformer(x))


class Decoder(nnx.Module):
  """[B, T, width] tokens -> [B, S, S, C] images, unclamped (official `TransformerDecoder`)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.patch_size, self.grid, self.channels = config.patch_size, config.grid, config.channels
    normal = nnx.initializers.normal(INIT_STDDEV)
    self.position_embedding = _positions(config.num_tokens, config.width, rngs)
    self.ln_pre = layer_norm(config.width, rngs=rngs)
    self.transformer = Transformer(config.block_config(), config.depth, rngs=rngs, kernel_init=normal)
    self.ln_post = layer_norm(config.width, rngs=rngs)
    self.ffn = linear(config.width, config.decoder_ffn_dim, rngs=rngs, axes=("embed", "mlp"),
                      **(_torch_linear_init(config.width) | dict(kernel_init=normal)))
    self.to_pixels = linear(config.decoder_ffn_dim, config.patch_dim, rngs=rngs, axes=("mlp", None),
                            **(_torch_linear_init(config.decoder_ffn_dim) | dict(kernel_init=normal)))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.ln_pre(tokens + self.position_embedding[...])
    x = self.ln_post(self.transformer(x))
    pixels = self.to_pixels(jnp.tanh(self.ffn(x)))
    return unpatchify(pixels, self.patch_size, self.grid, self.channels)


class BSQViT(nnx.Module):
  """The BSQ-ViT tokenizer. Images are NHWC float in [-1, 1]."""

  def __init__(self, config: Config | Mapping[str, Any], *, rngs: nnx.Rngs):
    if not isinstance(config, Config):
      config = configlib.from_dict(Config, config, where="BSQ-ViT config")
    self.config = config
    self.quantizer = quantizers.build(config.quantizer)
    dim = self.quantizer.dim
    self.encoder = Encoder(config, rngs=rngs)
    self.quant_embed = linear(config.width, dim, rngs=rngs, axes=("embed", None),
                              **_torch_linear_init(config.width))
    self.post_quant_embed = linear(dim, config.width, rngs=rngs, axes=(None, "embed"),
                                   **_torch_linear_init(dim))
    self.decoder = Decoder(config, rngs=rngs)

  def encode(self, images: jax.Array) -> tuple[jax.Array, QuantizerOutput]:
    """[B, S, S, C] -> (u [B, T, dim] the quantizer's input, its output)."""
    self.check_images(images)
    u = self.quant_embed(self.encoder(images))
    if self.config.l2_normalize:
      u = l2_normalize(u)
    return u, self.quantizer(u)

  def decode(self, quantized: jax.Array) -> jax.Array:
    """[B, T, dim] quantized latents -> [B, S, S, C] images, NOT clamped."""
    expected = (self.config.num_tokens, self.quantizer.dim)
    if quantized.ndim != 3 or tuple(quantized.shape[1:]) != expected:
      raise ValueError(f"BSQ-ViT decode expects latents of shape [B, {expected[0]}, {expected[1]}], "
                       f"got {tuple(quantized.shape)}")
    return self.decoder(self.post_quant_embed(quantized))

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    """[B, T, L] codes as in `QuantizerOutput.codes` (bits for BSQ) -> [B, S, S, C], NOT clamped."""
    return self.decode(self.quantizer.decode_codes(codes))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, QuantizerOutput]:
    """[B, S, S, C] -> (reconstruction clamped to [-1, 1], quantizer output)."""
    _, quantized = self.encode(images)
    return jnp.clip(self.decode(quantized.quantized), -1.0, 1.0), quantized

  def check_images(self, images: jax.Array) -> None:
    """Raises one clear error for a wrong shape, channel count, dtype or (if concrete) value range."""
    c = self.config
    shape = tuple(images.shape)
    if len(shape) != 4:
      raise ValueError(f"BSQ-ViT expects NHWC images [B, {c.image_size}, {c.image_size}, {c.channels}], "
                       f"got shape {shape}")
    if shape[3] != c.channels:
      raise ValueError(f"BSQ-ViT expects {c.channels} channels last (NHWC), got shape {shape}"
                       + (" (NCHW? transpose to NHWC)" if shape[1] == c.channels else ""))
    if shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"BSQ-ViT expects {c.image_size}x{c.image_size} images (config.image_size), "
                       f"got {shape[1]}x{shape[2]}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"BSQ-ViT expects floating-point images in [-1, 1], got dtype {images.dtype} "
                      "(for uint8 pixels use x / 127.5 - 1)")
    if not isinstance(images, jax.core.Tracer):
      low, high = float(jnp.min(images)), float(jnp.max(images))
      if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(f"BSQ-ViT expects images in [-1, 1], got values in [{low:.4g}, {high:.4g}]")

