"""Binary decode over a bit-packed key cache against binary attention on the unpacked prefix."""

import importlib.util
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.kernels import binary_decode as bd
from bitgen.kernels import binary_decode_gpu, binary_decode_tpu
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
    bd.binary_decode_attention(q, k_bits, k_scale, v, lengths, implementation="triton")


def _cache(key, batch, cache, heads, head_dim, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(key), 3)
  q = jax.random.normal(kq, (batch, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, cache, heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, cache, heads, head_dim), dtype)
  k_bits, k_scale = bd.pack_signs(k)
  return q, k_bits, k_scale, v


# Lengths: one key only, a partial last block, a length inside the first split, the full cache.
_LENGTHS = [1, 45, 70, 128]


@pytest.mark.parametrize("head_dim,heads", [(64, 1), (128, 2)])
def test_gpu_kernel_interpreted_matches_reference(head_dim, heads):
  q, k_bits, k_scale, v = _cache(head_dim, 4, 128, 2, head_dim)
  lengths = jnp.array(_LENGTHS, jnp.int32)
  want = bd.binary_decode_attention_reference(q, k_bits, k_scale, v, lengths)
  # NaN past each length (a cache's unwritten tail) must not reach the output.
  tail = jnp.arange(128)[None, :, None, None] >= lengths[:, None, None, None]
  v_dirty = jnp.where(tail, jnp.nan, v)
  q_bits, q_scale = bd.pack_signs(q)
  tuning = binary_decode_gpu.DecodeTuning(block_s=16, chunk=32, heads=heads)  # 4 splits x 2 steps
  got = binary_decode_gpu.binary_decode_gpu(q_bits, q_scale, k_bits, k_scale, v_dirty, lengths,
                                            tuning, interpret=True)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def test_gpu_merge_ignores_empty_splits():
  acc = jnp.array([[[[2.0], [0.0]]]])  # [B=1, N=1, splits=2, H=1]: split 1 saw no key
  m = jnp.array([[[1.0, -jnp.inf]]])
  l = jnp.array([[[4.0, 0.0]]])
  np.testing.assert_allclose(binary_decode_gpu.merge_splits(acc, m, l), [[[0.5]]])


@pytest.mark.parametrize("head_dim,dtype", [(64, jnp.float32), (128, jnp.bfloat16)])
def test_tpu_kernel_interpreted_matches_reference(head_dim, dtype):
  q, k_bits, k_scale, v = _cache(head_dim + 1, 4, 128, 3, head_dim, dtype)
  lengths = jnp.array(_LENGTHS, jnp.int32)
  want = bd.binary_decode_attention_reference(q, k_bits, k_scale, v, lengths).astype(jnp.float32)
  tail = jnp.arange(128)[None, :, None, None] >= lengths[:, None, None, None]
  q_bits, q_scale = bd.pack_signs(q)
  got = binary_decode_tpu.binary_decode_tpu(
      q_bits, q_scale, k_bits, k_scale, jnp.where(tail, jnp.nan, v).astype(dtype), lengths,
      binary_decode_tpu.TpuDecodeTuning(block_s=32), interpret=True)
  atol = 2e-6 if dtype == jnp.float32 else 2e-2  # bf16: P in bf16 on the MXU, output rounding
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=atol, rtol=atol)


def test_pallas_tpu_implementation_runs_the_interpreter_off_tpu():
  q, k_bits, k_scale, v = _cache(3, 2, 256, 1, 64)
  lengths = jnp.array([256, 130], jnp.int32)
  got = bd.binary_decode_attention(q, k_bits, k_scale, v, lengths, implementation="pallas_tpu")
  want = bd.binary_decode_attention_reference(q, k_bits, k_scale, v, lengths)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def test_kernels_refuse_or_fall_back_on_unsupported_shapes(caplog, monkeypatch):
  q, k_bits, k_scale, v = _cache(4, 2, 36, 1, 64)  # cache 36: no multiple of the blocks
  lengths = jnp.array([36, 3], jnp.int32)
  with pytest.raises(ValueError, match="pallas_gpu.*CUDA GPU"):
    bd.binary_decode_attention(q, k_bits, k_scale, v, lengths, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="pallas_tpu.*cache length 36"):
    bd.binary_decode_attention(q, k_bits, k_scale, v, lengths, implementation="pallas_tpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with caplog.at_level(logging.WARNING):
    got = bd.binary_decode_attention(q, k_bits, k_scale, v, lengths)
  assert "cache length 36" in caplog.text
  np.testing.assert_allclose(got, bd.binary_decode_attention_reference(q, k_bits, k_scale, v, lengths))


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tpu_decode_kernel_compiles_for_real_generations(topology, head_dim, monkeypatch):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install libtpu): cannot compile for a TPU topology")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology, "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # "auto" picks the TPU kernel
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch, cache, heads = 8, 32768, 16
  fn = jax.jit(bd.binary_decode_attention)
  compiled = fn.trace(spec((batch, heads, head_dim), jnp.bfloat16),
                      spec((batch, cache, heads, head_dim // 32), jnp.uint32),
                      spec((batch, cache, heads), jnp.float32),
                      spec((batch, cache, heads, head_dim), jnp.bfloat16),
                      spec((batch,), jnp.int32)).lower(lowering_platforms=("tpu",)).compile()
  assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_kernel_matches_reference(head_dim):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  q, k_bits, k_scale, v = _cache(head_dim, 4, 4096, 4, head_dim, jnp.bfloat16)
  lengths = jnp.array([1, 1000, 2049, 4096], jnp.int32)
  tail = jnp.arange(4096)[None, :, None, None] >= lengths[:, None, None, None]
  v_dirty = jnp.where(tail, jnp.nan, v)
  got = bd.binary_decode_attention(q, k_bits, k_scale, v_dirty, lengths, implementation="pallas_gpu")
  want = bd.binary_decode_attention_reference(q.astype(jnp.float32), k_bits, k_scale,
                                              v.astype(jnp.float32), lengths)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=1e-2, rtol=1e-2)
