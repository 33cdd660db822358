"""Attention math shared by every transformer in bitgen, behind one `kind` switch.

`kind="dense"` is softmax(q k^T / sqrt(d) + bias) v through `jax.nn.dot_product_attention`
(cuDNN flash attention on GPU where it applies, XLA elsewhere).
"""

from typing import Literal

import jax

AttentionKind = Literal["dense"]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    kind: AttentionKind = "dense",
) -> jax.Array:
  """q: [B, T, N, H], k/v: [B, S, N, H], bias: broadcastable to [B, N, T, S] -> [B, T, N, H]."""
  if kind == "dense":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  raise ValueError(f"unknown attention kind {kind!r}; expected one of {AttentionKind.__args__}")
