"""A tiny tokenizer with BSQ-ViT's call signature, for trainer tests independent of the real model.

`StandIn(rngs)(images [B,H,W,3]) -> (recon [B,H,W,3], QuantizerOutput)`: patchify, an MLP with
logical axis names (so it shards on the mesh), L2-normalised latents, sign quantization with a
straight-through gradient, and an MLP decoder.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.nn.linear import linear
from bitgen.quantizers.base import QuantizerOutput

PATCH = 4
WIDTH = 16
BITS = 8


def _patchify(x):  # [B, H, W, C] -> [B, T, P*P*C]
  b, h, w, c = x.shape
  x = x.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def _unpatchify(x, h, w):  # [B, T, P*P*C] -> [B, H, W, C]
  b = x.shape[0]
  x = x.reshape(b, h // PATCH, w // PATCH, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, 3)


class StandIn(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, bits: int = BITS):
    self.embed = linear(PATCH * PATCH * 3, WIDTH, rngs=rngs, axes=(None, "embed"))
    self.up = linear(WIDTH, 4 * WIDTH, rngs=rngs, axes=("embed", "mlp"))
    self.down = linear(4 * WIDTH, WIDTH, rngs=rngs, axes=("mlp", "embed"))
    self.quant = linear(WIDTH, bits, rngs=rngs, axes=("embed", None))
    self.post = linear(bits, WIDTH, rngs=rngs, axes=(None, "embed"))
    self.out = linear(WIDTH, PATCH * PATCH * 3, rngs=rngs, axes=("embed", None))

  def __call__(self, images):
    _, h, w, _ = images.shape
    x = self.embed(_patchify(images))
    x = x + self.down(jax.nn.gelu(self.up(x)))
    u = self.quant(x)
    u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    scale = 1.0 / jnp.sqrt(u.shape[-1])
    hard = jnp.where(u > 0, scale, -scale)
    zq = u + jax.lax.stop_gradient(hard - u)
    commit = 0.25 * jnp.mean(jnp.sum((jax.lax.stop_gradient(zq) - u) ** 2, axis=-1))
    codes = (u > 0).astype(jnp.uint8)
    recon = jnp.clip(_unpatchify(self.out(jnp.tanh(self.post(zq))), h, w), -1.0, 1.0)
    out = QuantizerOutput(quantized=zq, codes=codes, indices=None, loss=commit,
                          metrics={"commitment": commit, "bit_usage": codes.mean(axis=(0, 1))})
    return recon, out
