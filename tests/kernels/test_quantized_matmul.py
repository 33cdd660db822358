"""quantized_matmul: ternary packing, the exact reference, and the Pallas kernels (interpret mode)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.kernels import ternary_pack
from bitgen.kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference


def _int8(rng, shape):
  return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


def _ternary(rng, shape):
  return jnp.asarray(rng.integers(-1, 2, shape), jnp.int8)


@pytest.mark.parametrize("k", [16, 48, 512, 2048, 4096 + 2048])
def test_pack_unpack_round_trip(k):
  w = _ternary(np.random.default_rng(k), (5, k))
  words = ternary_pack.pack_ternary(w)
  assert words.shape == (5, k // 16) and words.dtype == jnp.uint32
  np.testing.assert_array_equal(ternary_pack.unpack_ternary(words), w)
  np.testing.assert_array_equal(ternary_pack.pack_ternary(w.astype(jnp.float32)), words)


def test_pack_layout_is_planes_of_a_group():
  # K = 32: one group of G = 2 words; value at offset j G + i sits in bits [2j, 2j + 2) of word i.
  assert ternary_pack.group_words(32) == 2
  assert ternary_pack.group_words(8192) == 128 and ternary_pack.group_words(768) == 16
  w = np.zeros((1, 32), np.int8)  # codes 1 everywhere (0b01 pairs)
  w[0, 2 * 3 + 1] = 1  # j = 3, i = 1: code 2 at bits 6..7 of word 1
  w[0, 2 * 15 + 0] = -1  # j = 15, i = 0: code 0 at bits 30..31 of word 0
  words = np.asarray(ternary_pack.pack_ternary(jnp.asarray(w)))
  all_zero = sum(1 << (2 * j) for j in range(16))
  assert words[0, 0] == all_zero - (1 << 30)
  assert words[0, 1] == all_zero + (1 << 6)


def test_pack_errors():
  with pytest.raises(ValueError, match="multiple of 16"):
    ternary_pack.pack_ternary(jnp.zeros((4, 24), jnp.int8))
  with pytest.raises(ValueError, match="2-D"):
    ternary_pack.pack_ternary(jnp.zeros((4, 16, 2), jnp.int8))
  with pytest.raises(TypeError, match="uint32"):
    ternary_pack.unpack_ternary(jnp.zeros((4, 2), jnp.int32))


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("x_shape", [(1, 64), (3, 5, 64), (37, 64)])
def test_reference_exact_and_scaled(ternary, x_shape):
  rng = np.random.default_rng(len(x_shape) + ternary)
  n, k = 24, x_shape[-1]
  x = _int8(rng, x_shape)
  w_int = _ternary(rng, (n, k)) if ternary else _int8(rng, (n, k))
  w = ternary_pack.pack_ternary(w_int) if ternary else w_int
  expected = np.asarray(x, np.int64) @ np.asarray(w_int, np.int64).T
  acc = quantized_matmul(x, w)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, expected)

  x_scale = jnp.asarray(rng.uniform(0.01, 1, x_shape[:-1]), jnp.float32)
  for w_scale in (jnp.asarray(rng.uniform(0.01, 1, (n,)), jnp.float32), jnp.float32(0.37)):
    out = quantized_matmul(x, w, (x_scale, w_scale), out_dtype=jnp.float32)
    want = expected * np.asarray(x_scale, np.float64)[..., None] * np.asarray(w_scale, np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-6)
  assert quantized_matmul(x, w, (x_scale, w_scale)).dtype == jnp.bfloat16


def test_bad_input_errors():
  x, w = jnp.zeros((2, 32), jnp.int8), jnp.zeros((4, 32), jnp.int8)
  with pytest.raises(TypeError, match="x must be int8"):
    quantized_matmul(x.astype(jnp.float32), w)
  with pytest.raises(ValueError, match="K=32"):
    quantized_matmul(x, jnp.zeros((4, 48), jnp.int8))
  with pytest.raises(ValueError, match="multiple of 16"):
    quantized_matmul(jnp.zeros((2, 40), jnp.int8), jnp.zeros((4, 3), jnp.uint32))
  with pytest.raises(TypeError, match="weights must be int8"):
    quantized_matmul(x, w.astype(jnp.float32))
  with pytest.raises(ValueError, match="x_scale must have shape"):
    quantized_matmul(x, w, (jnp.ones((3,)), jnp.ones((4,))))
  with pytest.raises(ValueError, match="w_scale must have shape"):
    quantized_matmul(x, w, (jnp.ones((2,)), jnp.ones((5,))))
  with pytest.raises(ValueError, match="without scales"):
    quantized_matmul(x, w, out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="unknown implementation"):
    quantized_matmul(x, w, implementation="cuda_graphs")
  with pytest.raises(ValueError, match="cannot run this call"):  # an explicit kernel never falls back
    quantized_matmul(jnp.zeros((2, 48), jnp.int8), jnp.zeros((4, 48), jnp.int8), implementation="gpu")


def test_auto_falls_back_to_reference_on_cpu_and_logs(caplog):
  rng = np.random.default_rng(0)
  x, w = _int8(rng, (3, 32)), _int8(rng, (8, 32))
  with caplog.at_level(logging.INFO, logger="bitgen.kernels.quantized_matmul"):
    out = quantized_matmul(x, w)
  np.testing.assert_array_equal(out, quantized_matmul_reference(x, w))
  assert "falls back to the reference" in caplog.text


# (M, K, N): the Mosaic GPU GEMV (int8 weights, padded rows of x; GPU interpret mode cannot run the
# ternary GEMV's register-operand wgmma, so ternary at these K goes to the GEMM), a decode shape the
# GEMV cannot take (N % 64) on the Triton GEMM, the Triton GEMM (M > 16, N % 128) and the Mosaic
# GPU GEMM (x's rows padded to the CTA tile).
GPU_SHAPES = [(5, 4096, 32), (3, 512, 64), (40, 512, 64), (20, 256, 128)]
TPU_SHAPES = [(8, 2048, 128), (40, 2048, 256)]


@pytest.mark.parametrize("implementation,shape", [("gpu", s) for s in GPU_SHAPES] + [("tpu", s) for s in TPU_SHAPES])
@pytest.mark.parametrize("ternary", [False, True])
def test_kernels_interpret_exact(implementation, shape, ternary):
  m, k, n = shape
  rng = np.random.default_rng(m + k + n + ternary)
  x = _int8(rng, (m, k))
  w = ternary_pack.pack_ternary(_ternary(rng, (n, k))) if ternary else _int8(rng, (n, k))
  acc = quantized_matmul(x, w, implementation=implementation, interpret=True)
  np.testing.assert_array_equal(acc, quantized_matmul_reference(x, w))
  scales = (jnp.asarray(rng.uniform(0.01, 1, (m,)), jnp.float32), jnp.asarray(rng.uniform(0.01, 1, (n,)), jnp.float32))
  out = quantized_matmul(x, w, scales, out_dtype=jnp.float32, implementation=implementation, interpret=True)
  np.testing.assert_allclose(out, quantized_matmul_reference(x, w, scales, out_dtype=jnp.float32), rtol=1e-6)


def test_gpu_dispatch_picks_the_kernel_per_shape():
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemm as mosaic_gemm
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  for ternary in (False, True):
    config = gpu.default_config(8, 8192, 8192, ternary)
    assert isinstance(config, gemv.GemvConfig)
    assert (8192 // gemv.ROWS) * config.split_k >= 128 and 8192 % (config.split_k * config.block_k) == 0
    assert isinstance(gpu.default_config(4096, 2048, 8192, ternary), mosaic_gemm.GemmConfig)
    assert isinstance(gpu.default_config(300, 2048, 96, ternary), gpu.GemmConfig)  # N % 128
    assert isinstance(gpu.default_config(8, 2048, 96, ternary), gpu.GemmConfig)  # N % 64: the GEMM
  assert isinstance(gpu.default_config(8, 1024, 64, True), gpu.GemmConfig)  # not whole 2048-groups
  assert "multiples of 32" in gpu.default_config(8, 48, 40, False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 8192, 1024), (5, 2048, 6144), (16, 8192, 2048), (3, 2048, 96),
                                   (300, 1024, 512)])
@pytest.mark.parametrize("ternary", [False, True])
def test_gpu_kernels_exact(shape, ternary):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  m, k, n = shape
  rng = np.random.default_rng(m + n + ternary)
  x = _int8(rng, (m, k))
  w_int = _ternary(rng, (n, k)) if ternary else _int8(rng, (n, k))
  w = ternary_pack.pack_ternary(w_int) if ternary else w_int
  # The truth is an int64 product on the host: XLA's own int8 dot is not trusted on the device.
  exact = np.asarray(x, np.int64) @ np.asarray(w_int, np.int64).T
  np.testing.assert_array_equal(quantized_matmul(x, w, implementation="gpu"), exact)
  x_scale, w_scale = rng.uniform(0.01, 1, (m,)).astype(np.float32), rng.uniform(0.01, 1, (n,)).astype(np.float32)
  out = quantized_matmul(x, w, (jnp.asarray(x_scale), jnp.asarray(w_scale)), out_dtype=jnp.float32, implementation="gpu")
  np.testing.assert_allclose(out, exact * x_scale[:, None].astype(np.float64) * w_scale, rtol=1e-6)
