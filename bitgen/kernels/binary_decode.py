"""Binary attention decode: one query token per sequence over a bit-packed key cache.

The cache keeps each key as its sign bits (`pack_signs`: uint32 words, 16x smaller than bf16) and
one float32 scale per (token, head) (s = mean|k| over the head dim, the per-token mode a growing
cache needs; `binary_attention(scale_mode="per_token")` is the matching prefill). The query is
binarised the same way (one token: per-head and per-token scales coincide):

  out[b, n] = softmax_j<lengths[b]( s_q s_k[j] (sign q . sign k[j]) / sqrt(H) ) v[b, :, n]

Since sign q . sign k = H - 2 popcount(bits_q xor bits_k), the scores need no unpacking at all:
that is what `binary_decode_attention_reference` computes, in XLA, so the packed cache is read as
packed words (XLA fuses the xor / popcount into the score reduction). The Pallas kernels do the
same in registers / VMEM, in one pass over the cache with an f32 online softmax:
`binary_decode_gpu` (Triton backend, split-K flash decoding) and `binary_decode_tpu` (Mosaic TPU).

The bf16 values dominate the bytes read (2H per token against H/8 for the packed key), so the best
case over a bf16 K+V cache is (4H) / (2H + H/8) = 1.88x.
"""

import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from bitgen.kernels import binary_decode_gpu, binary_decode_tpu
from bitgen.kernels._binarize import pack_signs, unpack_signs

__all__ = ["binary_decode_attention", "binary_decode_attention_reference", "pack_signs",
           "unpack_signs"]

IMPLEMENTATIONS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_log = logging.getLogger(__name__)


def _check(q, k_bits, k_scale, v, lengths):
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H] (one token per sequence), got shape {q.shape}")
  batch, heads, head_dim = q.shape
  words = -(-head_dim // 32)
  if k_bits.dtype != jnp.uint32 or k_bits.ndim != 4 or k_bits.shape[0] != batch or \
      k_bits.shape[2:] != (heads, words):
    raise ValueError(f"k_bits must be uint32 [B, S, N, ceil(H/32)] = [{batch}, S, {heads}, "
                     f"{words}] (pack_signs of [B, S, N, H] keys), got {k_bits.dtype} "
                     f"{k_bits.shape}")
  cache = k_bits.shape[1]
  if k_scale.shape != (batch, cache, heads):
    raise ValueError(f"k_scale must be [B, S, N] = {(batch, cache, heads)}, got {k_scale.shape}")
  if v.shape != (batch, cache, heads, head_dim):
    raise ValueError(f"v must be [B, S, N, H] = {(batch, cache, heads, head_dim)}, got {v.shape}")
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integer [B] = [{batch}], got {lengths.dtype} {lengths.shape}")


def binary_decode_attention_reference(q, k_bits, k_scale, v, lengths):
  """q: [B, N, H] real, k_bits: [B, S, N, W] uint32, k_scale: [B, S, N], v: [B, S, N, H],
  lengths: [B] valid cache entries (>= 1) -> [B, N, H] in v.dtype."""
  _check(q, k_bits, k_scale, v, lengths)
  head_dim = q.shape[-1]
  q_bits, q_scale = pack_signs(q)  # [B, N, W], [B, N]
  # sign q . sign k = H - 2 popcount(q xor k); padding bits beyond H are 0 in both.
  differ = lax.population_count(q_bits[:, None] ^ k_bits).astype(jnp.int32).sum(-1)  # [B, S, N]
  dots = (head_dim - 2 * differ).astype(jnp.float32)
  logits = dots * k_scale * (q_scale[:, None] / math.sqrt(head_dim))  # [B, S, N]
  valid = jnp.arange(k_bits.shape[1])[None, :, None] < lengths[:, None, None]
  logits = jnp.where(valid, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=1)
  # [B, N, H]: P in V's dtype (as the bf16 baseline) so XLA never writes an upcast copy of V.
  out = jnp.einsum("bsn,bsnh->bnh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)
  return out.astype(v.dtype)


def binary_decode_attention(q, k_bits, k_scale, v, lengths, *, implementation="auto"):
  """Decode over a packed key cache (see the module doc): [B, N, H] in v.dtype.

  implementation: "auto" runs the Pallas kernel of the backend it runs on (GPU: Triton, TPU: Mosaic
  TPU) and the XLA reference elsewhere or where the kernel cannot take the shapes (logged);
  "reference" the XLA popcount path; "pallas_gpu" / "pallas_tpu" force a kernel (an unsupported
  input raises; "pallas_tpu" off a TPU runs in the Pallas TPU interpreter).
  """
  _check(q, k_bits, k_scale, v, lengths)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  backend = jax.default_backend()
  name = implementation
  if implementation == "auto":
    name = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "reference")
  if name == "reference":
    return binary_decode_attention_reference(q, k_bits, k_scale, v, lengths)
  module = binary_decode_gpu if name == "pallas_gpu" else binary_decode_tpu
  reason = module.unsupported_reason(k_bits, v)
  if reason is not None:
    if implementation == "auto":
      _log.warning("binary_decode_attention: %s kernel cannot take these inputs (%s); using the "
                   "reference", name, reason)
      return binary_decode_attention_reference(q, k_bits, k_scale, v, lengths)
    raise ValueError(f"binary_decode_attention implementation={name!r} cannot take these inputs: "
                     f"{reason}")
  q_bits, q_scale = pack_signs(q)  # [B, N, W], [B, N]
  if name == "pallas_gpu":
    return binary_decode_gpu.binary_decode_gpu(q_bits, q_scale, k_bits, k_scale, v, lengths)
  return binary_decode_tpu.binary_decode_tpu(q_bits, q_scale, k_bits, k_scale, v, lengths,
                                             interpret=backend != "tpu")


def dense_decode_attention(q, k, v, lengths):
  """The bf16-cache baseline (plain softmax decode in XLA): q [B, N, H], k/v [B, S, N, H]."""
  logits = jnp.einsum("bnh,bsnh->bsn", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  valid = jnp.arange(k.shape[1])[None, :, None] < lengths[:, None, None]
  probs = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=1)
  return jnp.einsum("bsn,bsnh->bnh", probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def unpacked_keys(k_bits, k_scale, head_dim, dtype=jnp.float32):
  """[B, S, N, W] words, [B, S, N] scales -> k_hat = s_k sign(k): [B, S, N, H] (tests, debugging)."""
  return unpack_signs(k_bits, head_dim, dtype) * k_scale[..., None].astype(dtype)
