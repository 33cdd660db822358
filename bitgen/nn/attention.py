"""Attention math shared by every transformer in bitgen, behind one `kind` switch.

`kind="dense"` is softmax(q k^T / sqrt(d) + bias) v through `jax.nn.dot_product_attention`:
cuDNN flash attention on GPU for 16-bit inputs without bias or mask and head dims cuDNN takes
(`jax.nn.dot_product_attention` picks XLA unless asked), XLA elsewhere. `kind="binary"` is BinaryAttention
(1-bit Q/K with mean-|x| scales, clipped STE) through `bitgen.kernels.binary_attention`: the Pallas
kernel of the backend where it applies, its reference elsewhere; `mask` keeps its meaning (a
boolean mask broadcastable to [B, N, T, S]) and may also be "causal" or integer segment ids there.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from bitgen.kernels.binary_attention import binary_attention

AttentionKind = Literal["dense", "binary"]


def cudnn_applies(dtype) -> bool:
  """Whether cuDNN flash attention can run `dtype` here: 16-bit on an Ampere or newer GPU."""
  if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
    return False
  return float(getattr(jax.devices()[0], "compute_capability", "0")) >= 8.0


def dense_implementation(q: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
                         kv_lengths: jax.Array | None = None, kv_len: int | None = None) -> str | None:
  """"cudnn" where cuDNN flash attention applies (`cudnn_applies`, head dim <= 128 and a multiple
  of 8, no bias or mask; with `kv_lengths`, even query and key lengths `q.shape[1]`, `kv_len`, which
  its backward pass needs for padded keys), else None (XLA)."""
  head_dim = q.shape[-1]
  if bias is not None or mask is not None or head_dim > 128 or head_dim % 8 or not cudnn_applies(q.dtype):
    return None
  if kv_lengths is not None and (q.shape[1] % 2 or kv_len % 2):
    return None
  return "cudnn"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    kind: AttentionKind = "dense",
) -> jax.Array:
  """q: [B, T, N, H], k/v: [B, S, N, H], bias: broadcastable to [B, N, T, S] -> [B, T, N, H].

  kv_lengths: [B] int32, keys at positions >= the length are masked (padded key sequences). Unlike
  an equivalent boolean mask it keeps cuDNN flash attention in play for dense attention.
  """
  if kind == "dense":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, key_value_seq_lengths=kv_lengths,
                                        implementation=dense_implementation(q, bias, mask, kv_lengths, k.shape[1]))
  if kind == "binary":
    if kv_lengths is not None:
      valid = (jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
      mask = valid if mask is None else jnp.logical_and(mask, valid)
    return binary_attention(q, k, v, bias=bias, mask=mask)
  raise ValueError(f"unknown attention kind {kind!r}; expected one of {AttentionKind.__args__}")
