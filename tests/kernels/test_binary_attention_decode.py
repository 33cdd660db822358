"""Binary decode over a bit-packed key cache against binary attention on the unpacked prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.kernels import binary_decode as bd
from bitgen.kernels.binary_attention import binary_attention_reference


@pytest.mark.parametrize("head_dim", [64, 100, 128])
def test_decode_matches_binary_attention_on_each_prefix(head_dim):
  batch, cache, heads = 3, 40, 2
  kq, kk, kv = jax.random.split(jax.random.key(head_dim), 3)
  q = jax.random.normal(kq, (batch, heads, head_dim)).at[0, 0, :3].set(0.0)  # sign(0) = +1
  k = jax.random.normal(kk, (batch, cache, heads, head_dim))
  v = jax.random.normal(kv, (batch, cache, heads, head_dim))
  lengths = jnp.array([1, 17, 40], jnp.int32)
  k_bits, k_scale = bd.pack_signs(k)
  # Garbage beyond each length must not matter.
  v_dirty = v.at[0, 1:].set(1e4)
  got = bd.binary_decode_attention(q, k_bits, k_scale, v_dirty, lengths)
  assert got.shape == (batch, heads, head_dim)
  for b, length in enumerate(lengths.tolist()):
    want = binary_attention_reference(q[b, None, None], k[b, None, :length], v[b, None, :length],
                                      scale_mode="per_token")[0, 0]
    np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=1e-5)


def test_packed_cache_equals_unpacked_keys_in_dense_decode():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jnp.sign(jax.random.normal(kq, (2, 1, 64))) * 0.5  # already binary: s_q = 0.5
  k = jax.random.normal(kk, (2, 24, 1, 64))
  v = jax.random.normal(kv, (2, 24, 1, 64))
  lengths = jnp.array([24, 9], jnp.int32)
  k_bits, k_scale = bd.pack_signs(k)
  dense = bd.dense_decode_attention(q, bd.unpacked_keys(k_bits, k_scale, 64), v, lengths)
  np.testing.assert_allclose(bd.binary_decode_attention(q, k_bits, k_scale, v, lengths), dense,
                             atol=1e-5)


def test_decode_rejects_bad_inputs():
  q = jnp.zeros((2, 1, 64))
  k_bits, k_scale = bd.pack_signs(jnp.ones((2, 8, 1, 64)))
  v = jnp.zeros((2, 8, 1, 64))
  lengths = jnp.array([8, 8])
  with pytest.raises(ValueError, match=r"q must be \[B, N, H\]"):
    bd.binary_decode_attention(q[:, None], k_bits, k_scale, v, lengths)
  with pytest.raises(ValueError, match="k_bits must be uint32"):
    bd.binary_decode_attention(q, k_bits.astype(jnp.int32), k_scale, v, lengths)
  with pytest.raises(ValueError, match="lengths"):
    bd.binary_decode_attention(q, k_bits, k_scale, v, lengths[:1])
  with pytest.raises(ValueError, match="implementation"):
    bd.binary_decode_attention(q, k_bits, k_scale, v, lengths, implementation="pallas_tpu")
