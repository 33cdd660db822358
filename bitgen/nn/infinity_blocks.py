"""Building blocks of the Infinity transformer (official `infinity/models/basic.py`).

- `SelfAttention`: fused qkv projection with q/v biases (k bias is zero), cosine attention (q, k
  L2-normalised, q scaled by a learned per-head `exp(min(log_scale, log 100))`), 2D RoPE on q and k
  after the normalisation, softmax without further scaling.
- `CrossAttention`: q from the image tokens (or one learned query per head for the attentive text
  pool), k/v from the projected text features, standard 1/sqrt(head_dim) scaling, padded text
  masked by its lengths (`kv_lengths`, so that cuDNN flash attention applies on GPU).
- `CrossAttnBlock`: shared AdaLN (the block's learned `ada_gss` + the shared condition projection)
  around self-attention and the FFN; a plain pre-LN cross-attention in between.
- `AdaLNBeforeHead`: AdaLN with its own condition projection before the output head.

Activations are [B, T, C] in the parameters' dtype (float32 for training and parity, bfloat16 for
fast inference: norms, L2 normalisation and RoPE compute in float32 and cast back); attention goes
through `bitgen.nn.attention.attention` and every projection through `bitgen.nn.linear.linear`, so
their `kind` switches reach this model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.nn.attention import AttentionKind, attention
from bitgen.nn.linear import LinearKind, linear
from bitgen.nn.norms import layer_norm
from bitgen.parallel.axes import with_axes

MAX_LOG_SCALE = math.log(100.0)
# The official RoPE frequency grid covers positions 0..127 on each axis (2048 px / 16).
ROPE_GRID_SIZE = 2048 // 16


def param(init, shape: tuple[int, ...], axes: tuple[str | None, ...], rngs: nnx.Rngs) -> nnx.Param:
  return nnx.Param(with_axes(init, axes)(rngs.params(), shape))


def plain_layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters (the official `ln_wo_grad`), two-pass variance."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch F.normalize over the last axis."""
  x32 = x.astype(jnp.float32)
  return (x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Official `FastRMSNorm`: x * rsqrt(mean(x^2) + eps) * weight."""

  def __init__(self, width: int, *, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(nnx.initializers.ones_init(), (width,), ("norm",), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...]).astype(jnp.result_type(x, self.weight[...]))


def rope2d_cos_sin(grids: tuple[tuple[int, int], ...], rope_grid: tuple[int, int], head_dim: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(L, head_dim/2) cos and sin of the official 2D RoPE (`rope2d_normalized_by_hw=2`), float32.

  Pair j < head_dim/4 rotates by the token's row position, pair j >= head_dim/4 by its column; a
  scale (h, w) sits on the rope_grid (the ratio's 1M grid) at round(i * H/h), round(j * W/w)
  (float32, round half to even, as torch).
  """
  half = head_dim // 2
  inv_freq = np.float32(1.0) / (np.float32(10000.0) ** (
      np.arange(0, half, 2).astype(np.float32) / np.float32(half)))
  positions = np.arange(ROPE_GRID_SIZE, dtype=np.float32)
  freqs = np.outer(positions, inv_freq).astype(np.float32)  # [128, half/2]
  rows, cols = [], []
  grid_h, grid_w = rope_grid
  for h, w in grids:
    ri = np.round(np.arange(h, dtype=np.float32) * np.float32(grid_h / h)).astype(np.int64)
    ci = np.round(np.arange(w, dtype=np.float32) * np.float32(grid_w / w)).astype(np.int64)
    rows.append(np.repeat(ri, w))
    cols.append(np.tile(ci, h))
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  angles = np.concatenate([freqs[rows], freqs[cols]], axis=-1)  # [L, half]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (2j, 2j+1) of x [B, T, N, H] by angle tables cos/sin [T, H/2] (float32)."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, H/2]
  rotated = jnp.stack([cos * even - sin * odd, sin * even + cos * odd], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class SelfAttention(nnx.Module):
  """Cosine self-attention with the learned per-head scale and 2D RoPE."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, linear_kind: LinearKind = "dense",
               attention_kind: AttentionKind = "dense"):
    self.heads, self.head_dim, self.attention_kind = heads, width // heads, attention_kind
    self.mat_qkv = linear(width, 3 * width, rngs=rngs, kind=linear_kind, use_bias=False,
                          axes=("embed", "heads"))
    self.q_bias = param(nnx.initializers.zeros_init(), (width,), ("heads",), rngs)
    self.v_bias = param(nnx.initializers.zeros_init(), (width,), ("heads",), rngs)
    self.log_scale = param(nnx.initializers.constant(math.log(4.0)), (heads,), ("heads",), rngs)
    self.proj = linear(width, width, rngs=rngs, kind=linear_kind, axes=("heads", "embed"))

  def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, C] -> q, k, v [B, T, N, H]; q and k normalised, scaled and rotated."""
    bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.v_bias[...]), self.v_bias[...]])
    qkv = (self.mat_qkv(x) + bias).reshape(*x.shape[:-1], 3, self.heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    scale = jnp.exp(jnp.minimum(self.log_scale[...], MAX_LOG_SCALE))[:, None]  # [N, 1]
    q = apply_rope(l2_normalize(q) * scale, cos, sin)
    k = apply_rope(l2_normalize(k), cos, sin)
    return q, k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
             implementation: str | None = None) -> jax.Array:
    """Softmax(q k^T) v (no 1/sqrt(H): cosine attention carries its own scale) -> [B, T, C].

    implementation: None goes through `bitgen.nn.attention` (the model's attention kind); "cudnn"
    or "xla" call `jax.nn.dot_product_attention` with that implementation (dense attention only;
    the sampler picks cuDNN flash attention on GPU in bfloat16).
    """
    if implementation is not None and self.attention_kind == "dense":
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=implementation)
    else:
      # `attention` divides the logits by sqrt(H); pre-multiplying q undoes it.
      out = attention(q * math.sqrt(self.head_dim), k, v, mask=mask, kind=self.attention_kind)
    return self.proj(out.reshape(*out.shape[:-2], -1))

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
    return self.attend(*self.qkv(x, cos, sin), mask)


class CrossAttention(nnx.Module):
  """Attention from queries to padded key/value features [B, S, kv_width], the first kv_lengths [B] valid.

  `pooled=True` is the official attentive text pool: one learned query per head, output [B, 1, C].
  """

  def __init__(self, width: int, kv_width: int, heads: int, *, rngs: nnx.Rngs, pooled: bool = False,
               linear_kind: LinearKind = "dense", attention_kind: AttentionKind = "dense"):
    self.heads, self.head_dim, self.attention_kind = heads, width // heads, attention_kind
    if pooled:
      init = nnx.initializers.truncated_normal(math.sqrt(1 / width / 3))
      self.mat_q = param(init, (1, heads, self.head_dim), (None, "heads", "kv"), rngs)
    else:
      self.mat_q = linear(width, width, rngs=rngs, kind=linear_kind, axes=("embed", "heads"))
    self.mat_kv = linear(kv_width, 2 * width, rngs=rngs, kind=linear_kind, use_bias=False,
                         axes=("embed", "heads"))
    self.v_bias = param(nnx.initializers.zeros_init(), (width,), ("heads",), rngs)
    self.proj = linear(width, width, rngs=rngs, kind=linear_kind, axes=("heads", "embed"))

  def __call__(self, x: jax.Array | None, kv: jax.Array, kv_lengths: jax.Array) -> jax.Array:
    batch = kv.shape[0]
    bias = jnp.concatenate([jnp.zeros_like(self.v_bias[...]), self.v_bias[...]])
    kv = (self.mat_kv(kv) + bias).reshape(batch, kv.shape[1], 2, self.heads, self.head_dim)
    if x is None:  # [B, 1, N, H]
      q = jnp.broadcast_to(self.mat_q[...], (batch, *self.mat_q.shape))
    else:
      q = self.mat_q(x).reshape(*x.shape[:-1], self.heads, self.head_dim)
    out = attention(q, kv[:, :, 0], kv[:, :, 1], kv_lengths=kv_lengths, kind=self.attention_kind)
    return self.proj(out.reshape(*out.shape[:-2], -1))


class FFN(nnx.Module):
  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, linear_kind: LinearKind = "dense"):
    self.fc1 = linear(width, hidden, rngs=rngs, kind=linear_kind, axes=("embed", "mlp"))
    self.fc2 = linear(hidden, width, rngs=rngs, kind=linear_kind, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class CrossAttnBlock(nnx.Module):
  """x += gamma1 * SA(AdaLN1(x)); x += CA(LN(x), text); x += gamma2 * FFN(AdaLN2(x))."""

  def __init__(self, width: int, heads: int, mlp_hidden: int, *, norm_eps: float, rngs: nnx.Rngs,
               linear_kind: LinearKind = "dense", attention_kind: AttentionKind = "dense"):
    self.norm_eps = norm_eps
    kinds = dict(linear_kind=linear_kind, attention_kind=attention_kind)
    self.ada_gss = param(nnx.initializers.normal(1 / math.sqrt(width)), (6, width), (None, "embed"), rngs)
    self.sa = SelfAttention(width, heads, rngs=rngs, **kinds)
    self.ca = CrossAttention(width, width, heads, rngs=rngs, **kinds)
    self.ca_norm = layer_norm(width, eps=norm_eps, rngs=rngs)
    self.ffn = FFN(width, mlp_hidden, rngs=rngs, linear_kind=linear_kind)

  def modulation(self, shared_gss: jax.Array) -> list[jax.Array]:
    """shared [B, 1, 6, C] -> gamma1, gamma2, scale1, scale2, shift1, shift2, each [B, 1, C]."""
    gss = self.ada_gss[...] + shared_gss
    return [gss[:, :, i] for i in range(6)]

  def __call__(self, x: jax.Array, shared_gss: jax.Array, text: jax.Array, text_lengths: jax.Array,
               cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
    gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(shared_gss)
    x = x + self.sa(plain_layer_norm(x, self.norm_eps) * (scale1 + 1) + shift1, cos, sin, mask) * gamma1
    return self.cross_and_ffn(x, gamma2, scale2, shift2, text, text_lengths)

  def cross_and_ffn(self, x, gamma2, scale2, shift2, text, text_lengths) -> jax.Array:
    x = x + self.ca(self.ca_norm(x), text, text_lengths)
    return x + self.ffn(plain_layer_norm(x, self.norm_eps) * (scale2 + 1) + shift2) * gamma2


class AdaLNBeforeHead(nnx.Module):
  def __init__(self, width: int, cond_width: int, *, norm_eps: float, rngs: nnx.Rngs,
               linear_kind: LinearKind = "dense"):
    self.norm_eps = norm_eps
    self.ada_lin = linear(cond_width, 2 * width, rngs=rngs, kind=linear_kind, axes=("embed", None))

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """x [B, T, C], cond [B, D] -> [B, T, C]."""
    scale_shift = self.ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 2, -1)
    return plain_layer_norm(x, self.norm_eps) * (scale_shift[:, :, 0] + 1) + scale_shift[:, :, 1]
