"""The StyleGAN2 discriminator (resnet architecture) that the official BSQ-ViT trains against.

Official: `transcoder/models/discriminator/stylegan.py::StyleGANDiscriminator` (NVIDIA's StyleGAN2-ADA
discriminator), built by `transcoder/losses/vqperceptual.py` as
`StyleGANDiscriminator(0, disc_input_size, 3, channel_base=32768, epilogue_kwargs={'mbstd_group_size': 4})`:

  images [B, S, S, 3]
  -> one block per resolution S, S/2, ..., 8 (the first starts with "fromrgb", a 1x1 conv + lrelu):
       skip = blur -> stride 2 -> 1x1 conv (no bias), gain sqrt(1/2)
       x = conv3x3 + lrelu -> blur -> conv3x3 stride 2 + lrelu (gain sqrt(1/2));  x = skip + x
  -> epilogue at 4x4: minibatch stddev (groups of 4, one channel) -> conv3x3 + lrelu
     -> flatten (channel-major, as NCHW) -> dense + lrelu -> dense to one logit per image [B, 1]

Channels at resolution r: min(channel_base // r, channel_max). Every weight is equalised-lr: stored
N(0, 1) and scaled by 1/sqrt(fan_in) in the forward pass; biases start at 0. lrelu is
leaky_relu(0.2) * sqrt(2) (`bias_act` "lrelu"). The blur is the [1, 3, 3, 1] outer-product filter
normalised to sum 1, with StyleGAN's padding (`conv2d_resample`, `upfirdn2d.downsample2d`).
No conditioning (c_dim 0), no conv clamp, float32 (the official bf16 blocks are an amp detail).
It trains from scratch with the tokenizer (see `bitgen.train.gan`); no pretrained weights exist.
Images are NHWC here; the official code is NCHW.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.nn.linear import linear
from bitgen.parallel.axes import with_axes

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
RESNET_GAIN = math.sqrt(0.5)
_BLUR = np.outer([1.0, 3.0, 3.0, 1.0], [1.0, 3.0, 3.0, 1.0]) / 64.0  # [4, 4], sums to 1


@dataclasses.dataclass(frozen=True)
class Config:
  """The official discriminator: `image_size` is its input resolution (`disc_input_size`)."""

  image_size: int
  channels: int = 3
  channel_base: int = 32768
  channel_max: int = 512
  mbstd_group_size: int = 4
  mbstd_channels: int = 1

  def __post_init__(self):
    size = self.image_size
    if size < 8 or size & (size - 1):
      raise ValueError(f"the StyleGAN discriminator needs a power-of-two image_size >= 8, got {size}")
    if min(self.channel_base, self.channel_max, self.channels, self.mbstd_group_size) <= 0:
      raise ValueError(f"discriminator sizes must be positive: {self}")

  def width(self, resolution: int) -> int:
    return min(self.channel_base // resolution, self.channel_max)

  @property
  def block_resolutions(self) -> tuple[int, ...]:
    return tuple(2 ** i for i in range(int(math.log2(self.image_size)), 2, -1))


def lrelu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


def blur(x: jax.Array, pad: int, stride: int = 1) -> jax.Array:
  """The [1,3,3,1] low-pass filter per channel after zero-padding `pad` pixels: [B,H,W,C]."""
  channels = x.shape[-1]
  kernel = jnp.broadcast_to(jnp.asarray(_BLUR, x.dtype)[:, :, None, None], (4, 4, 1, channels))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


class EqualizedConv(nnx.Module):
  """StyleGAN's `Conv2dLayer`: weights N(0, 1) scaled by 1/sqrt(fan_in) at run time.

  `down=2` blurs first and convolves with stride 2 (for k=1 the blur itself takes the stride), so
  the output is exactly half the input size. "SAME" padding k // 2 otherwise.
  """

  def __init__(self, c_in: int, c_out: int, kernel: int, *, rngs: nnx.Rngs, bias: bool = True,
               down: int = 1):
    self.kernel_size, self.down = kernel, down
    self.gain = 1.0 / math.sqrt(c_in * kernel * kernel)
    init = with_axes(nnx.initializers.normal(1.0), (None, None, "conv_in", "conv_out"))
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, c_in, c_out)))
    self.bias = (nnx.Param(with_axes(nnx.initializers.zeros_init(), ("conv_out",))(
        rngs.params(), (c_out,))) if bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    k, stride, pad = self.kernel_size, 1, self.kernel_size // 2
    if self.down > 1:
      if k == 1:  # StyleGAN's fast path: downsample with the filter, then the 1x1 conv
        x, pad = blur(x, pad=1, stride=self.down), 0
      else:  # filter with the padding of both ops, then a strided valid conv
        x, stride, pad = blur(x, pad=pad + 1), self.down, 0
    # [B, H, W, C_in] -> [B, H', W', C_out]
    y = jax.lax.conv_general_dilated(
        x, self.kernel.get_value() * self.gain, window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if self.bias is None else y + self.bias.get_value()


class DiscriminatorBlock(nnx.Module):
  """One resolution of the resnet discriminator; halves the size."""

  def __init__(self, config: Config, resolution: int, *, rngs: nnx.Rngs):
    tmp, out = config.width(resolution), config.width(resolution // 2)
    first = resolution == config.image_size
    self.fromrgb = EqualizedConv(config.channels, tmp, 1, rngs=rngs) if first else None
    self.conv0 = EqualizedConv(tmp, tmp, 3, rngs=rngs)
    self.conv1 = EqualizedConv(tmp, out, 3, rngs=rngs, down=2)
    self.skip = EqualizedConv(tmp, out, 1, rngs=rngs, bias=False, down=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fromrgb is not None:
      x = lrelu(self.fromrgb(x))
    skip = self.skip(x) * RESNET_GAIN
    x = lrelu(self.conv0(x))
    x = lrelu(self.conv1(x)) * RESNET_GAIN
    return skip + x


def minibatch_stddev(x: jax.Array, group_size: int, channels: int = 1) -> jax.Array:
  """Appends `channels` feature maps holding the stddev over groups of `group_size` images.

  Official `MinibatchStdLayer`: image i belongs to group i mod (B / G) (strided groups); the
  statistic is averaged over pixels and the channels of each of the `channels` channel groups.
  """
  b, h, w, c = x.shape
  g = min(group_size, b)
  if b % g:
    raise ValueError(f"minibatch stddev: batch {b} is not divisible by the group size {g}")
  y = x.reshape(g, b // g, h, w, channels, c // channels)  # [G, n, H, W, F, c]
  y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)                  # [n, H, W, F, c]
  y = jnp.mean(y, axis=(1, 2, 4))                          # [n, F]
  y = jnp.tile(y, (g, 1))                                  # [B, F]: image i gets group i mod n
  y = jnp.broadcast_to(y[:, None, None, :], (b, h, w, channels))
  return jnp.concatenate([x, y], axis=-1)


class Epilogue(nnx.Module):
  """The 4x4 head: minibatch stddev, conv, dense, one logit."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config.width(4)
    self.group_size, self.mbstd_channels = config.mbstd_group_size, config.mbstd_channels
    self.conv = EqualizedConv(c + config.mbstd_channels, c, 3, rngs=rngs)
    normal = nnx.initializers.normal(1.0)
    self.fc = linear(c * 16, c, rngs=rngs, axes=("conv_in", "conv_out"), kernel_init=normal)
    self.out = linear(c, 1, rngs=rngs, axes=("conv_in", None), kernel_init=normal)
    self.fc_gain, self.out_gain = 1.0 / math.sqrt(c * 16), 1.0 / math.sqrt(c)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = minibatch_stddev(x, self.group_size, self.mbstd_channels)
    x = lrelu(self.conv(x))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # [B, C*4*4], channel-major
    # Equalised lr: (x * g) @ W + b == x @ (W * g) + b.
    x = lrelu(self.fc(x * self.fc_gain))
    return self.out(x * self.out_gain)


class StyleGANDiscriminator(nnx.Module):
  """images [B, S, S, C] in [-1, 1] -> logits [B, 1] (real > 0)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    self.blocks = nnx.List([DiscriminatorBlock(config, r, rngs=rngs)
                            for r in config.block_resolutions])
    self.epilogue = Epilogue(config, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, c.channels):
      raise ValueError(f"the discriminator takes images [B, {c.image_size}, {c.image_size}, "
                       f"{c.channels}] (NHWC), got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    for block in self.blocks:
      x = block(x)
    return self.epilogue(x)
