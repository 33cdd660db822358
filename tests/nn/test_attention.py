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
