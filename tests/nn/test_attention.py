"""bitgen.nn.attention: which dense implementation runs where."""

import jax
import jax.numpy as jnp
import pytest

from bitgen.nn import attention as attention_lib


@pytest.mark.parametrize("capability, dtype, head_dim, use_mask, expected", [
    ("9.0", jnp.bfloat16, 64, False, "cudnn"),
    ("8.0", jnp.float16, 128, False, "cudnn"),
    ("7.5", jnp.bfloat16, 64, False, None),  # pre-Ampere (a Colab T4): cuDNN flash attention refuses
    ("9.0", jnp.float32, 64, False, None),
    ("9.0", jnp.bfloat16, 96 + 4, False, None),
    ("9.0", jnp.bfloat16, 256, False, None),
    ("9.0", jnp.bfloat16, 64, True, None),
])
def test_dense_attention_asks_for_cudnn_only_where_it_applies(monkeypatch, capability, dtype, head_dim,
                                                             use_mask, expected):
  class FakeGpu:
    compute_capability = capability
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *args: [FakeGpu()])
  q = jnp.zeros((1, 4, 2, head_dim), dtype)
  mask = jnp.ones((1, 1, 4, 4), bool) if use_mask else None
  assert attention_lib.dense_implementation(q, None, mask) == expected


@pytest.mark.parametrize("q_len, kv_len, expected", [(4, 64, "cudnn"), (1, 64, None), (4, 7, None)])
def test_padded_keys_use_cudnn_only_at_even_lengths(monkeypatch, q_len, kv_len, expected):
  """cuDNN's backward pass refuses padded keys at odd query or key lengths (e.g. Infinity's one
  pooled text query), so those stay on XLA."""
  class FakeGpu:
    compute_capability = "9.0"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *args: [FakeGpu()])
  q = jnp.zeros((2, q_len, 2, 64), jnp.bfloat16)
  lengths = jnp.array([kv_len, 1], jnp.int32)
  assert attention_lib.dense_implementation(q, None, None, lengths, kv_len) == expected


def _padded_inputs():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (3, 5, 2, 8))
  k = jax.random.normal(kk, (3, 7, 2, 8))
  v = jax.random.normal(kv, (3, 7, 2, 8))
  lengths = jnp.array([7, 1, 4], jnp.int32)
  return q, k, v, lengths, jnp.arange(7)[None, :] < lengths[:, None]  # valid [B, S]


@pytest.mark.parametrize("kind", ["dense", "binary"])
def test_kv_lengths_equal_the_padding_mask(kind):
  q, k, v, lengths, valid = _padded_inputs()
  expected = attention_lib.attention(q, k, v, mask=valid[:, None, None, :], kind=kind)
  assert jnp.allclose(attention_lib.attention(q, k, v, kv_lengths=lengths, kind=kind), expected, atol=1e-5)


def test_dense_attention_ignores_padded_keys():
  """(Binary attention does not: its per-head key scale is a mean over every key, padded ones
  included, as the official module computes it.)"""
  q, k, v, lengths, valid = _padded_inputs()
  junk = lambda x: jnp.where(valid[:, :, None, None], x, 1e4)
  assert jnp.allclose(attention_lib.attention(q, junk(k), junk(v), kv_lengths=lengths),
                      attention_lib.attention(q, k, v, kv_lengths=lengths), atol=1e-5)
