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
  # K = 32: one group of B = 8 bytes; value at offset s B + i sits in bits [2s, 2s + 2) of byte i,
  # and byte i is bits [8 (i % 4), 8 (i % 4) + 8) of word i // 4.
  assert ternary_pack.group_bytes(32) == 8
  assert ternary_pack.group_bytes(8192) == 128 and ternary_pack.group_bytes(768) == 64
  w = np.zeros((1, 32), np.int8)  # codes 0b00 everywhere
  w[0, 8 * 3 + 5] = 1  # s = 3, i = 5: code 0b01 at bits 6..7 of byte 5 = bits 14..15 of word 1
  w[0, 8 * 1 + 2] = -1  # s = 1, i = 2: code 0b11 at bits 2..3 of byte 2 = bits 18..19 of word 0
  words = np.asarray(ternary_pack.pack_ternary(jnp.asarray(w)))
  np.testing.assert_array_equal(words[0], [3 << 18, 1 << 14])


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


def _operands(rng, m, k, n, ternary):
  """x [M, K] int8, the weights (int8 or packed ternary) and their int8 values."""
  x = _int8(rng, (m, k))
  w_int = _ternary(rng, (n, k)) if ternary else _int8(rng, (n, k))
  return x, (ternary_pack.pack_ternary(w_int) if ternary else w_int), w_int


def _gpu_kernel_name(config) -> str:
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemm as mosaic_gemm
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  names = {gemv.GemvConfig: "gemv", mosaic_gemm.GemmConfig: "mosaic_gemm", gpu.GemmConfig: "triton_gemm"}
  return "refused" if isinstance(config, str) else names[type(config)]


# (M, K, N), odd M and N: the Mosaic GPU GEMV (int8; N padded to 64-channel blocks: 96 = 64 + 32,
# 200, 32) and the Mosaic GPU GEMM (M > 16, and ternary weights whose K is not whole 2048-value
# groups; rows of x and w padded to the tiles). GPU interpret mode cannot run the ternary GEMV's
# register-operand wgmma, so no ternary shape here routes to it (K < 2048).
GPU_SHAPES = [(3, 256, 96, False, "gemv"), (5, 128, 200, False, "gemv"), (16, 128, 32, False, "gemv"),
              (3, 256, 96, True, "mosaic_gemm"), (17, 256, 96, False, "mosaic_gemm"),
              (17, 128, 200, True, "mosaic_gemm")]
TPU_SHAPES = [(8, 2048, 128), (40, 2048, 256)]


@pytest.mark.parametrize("m,k,n,ternary,kernel", GPU_SHAPES)
def test_gpu_kernels_interpret_exact(m, k, n, ternary, kernel):
  from bitgen.kernels import quantized_matmul_gpu as gpu
  assert _gpu_kernel_name(gpu.default_config(m, k, n, ternary)) == kernel
  _check_interpret_exact("gpu", m, k, n, ternary)


@pytest.mark.parametrize("shape", TPU_SHAPES)
@pytest.mark.parametrize("ternary", [False, True])
def test_tpu_kernel_interpret_exact(shape, ternary):
  _check_interpret_exact("tpu", *shape, ternary)


def _check_interpret_exact(implementation, m, k, n, ternary):
  rng = np.random.default_rng(m + k + n + ternary)
  x, w, _ = _operands(rng, m, k, n, ternary)
  acc = quantized_matmul(x, w, implementation=implementation, interpret=True)
  np.testing.assert_array_equal(acc, quantized_matmul_reference(x, w))
  scales = (jnp.asarray(rng.uniform(0.01, 1, (m,)), jnp.float32),
            jnp.asarray(rng.uniform(0.01, 1, (n,)), jnp.float32))
  out = quantized_matmul(x, w, scales, out_dtype=jnp.float32, implementation=implementation,
                         interpret=True)
  np.testing.assert_allclose(out, quantized_matmul_reference(x, w, scales, out_dtype=jnp.float32), rtol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 5, 8, 15, 16, 17, 40, 300])
@pytest.mark.parametrize("n", [32, 96, 200, 1024])
def test_gpu_routing_takes_any_m_and_n(m, n):
  # Odd M and N (96 = 64 + 32, 200) route to the Mosaic GPU kernels, never to the Triton GEMM.
  from bitgen.kernels import quantized_matmul_gpu as gpu
  decode = m <= 16
  assert _gpu_kernel_name(gpu.default_config(m, 4096, n, False)) == ("gemv" if decode else "mosaic_gemm")
  assert _gpu_kernel_name(gpu.default_config(m, 4096, n, True)) == ("gemv" if decode else "mosaic_gemm")
  # Ternary K not in whole 2048-value groups: unpacked to int8, then the GEMM.
  assert _gpu_kernel_name(gpu.default_config(m, 1024, n, True)) == "mosaic_gemm"
  reason = gpu.default_config(m, 48, n, False)
  assert _gpu_kernel_name(reason) == "refused" and "K % 128" in reason and "K=48" in reason
  # Past 2^17 the ternary GEMV's accumulator of 64 w x could overflow int32: the GEMM takes it.
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  assert isinstance(gemv.default_config(8, 1 << 17, 64, True), gemv.GemvConfig)
  reason = gemv.default_config(8, (1 << 17) + 2048, 64, True)
  assert isinstance(reason, str) and "int32 accumulator" in reason
  assert _gpu_kernel_name(gpu.default_config(8, (1 << 17) + 2048, 64, True)) == "mosaic_gemm"


def test_gpu_gemv_split_k_only_where_the_channel_blocks_leave_multiprocessors_idle():
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  for ternary in (False, True):  # 128 blocks of 64 channels: one K slice, one kernel
    assert gpu.default_config(8, 8192, 8192, ternary).split_k == 1
  config = gpu.default_config(3, 8192, 96, False)  # 2 blocks of 64 channels: as many slices as K allows
  assert config.split_k == 8192 // config.block_k
  config = gpu.default_config(8, 8192, 2048, False)  # 32 blocks: slices until half the SMs are busy
  assert (2048 // gemv.ROWS) * config.split_k >= 66 and 8192 % (config.split_k * config.block_k) == 0


@pytest.mark.parametrize("warpgroups,split_k", [(1, 1), (2, 1), (2, 2)])
def test_gpu_ternary_gemv_lowers_for_cuda_on_cpu(warpgroups, split_k):
  """The register-level ternary GEMV traces and lowers to a Mosaic GPU call (no GPU needed)."""
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  config = gemv.GemvConfig(block_k=2048, split_k=split_k, stages=2, warpgroups=warpgroups)
  m, k, n = 5, 4096, 128
  fn = jax.jit(lambda x, w, xs, ws: gpu.matmul(x, w, xs, ws, config=config, scaled=True,
                                               out_dtype=jnp.bfloat16))
  args = (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((n, k // 16), jnp.uint32),
          jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32))
  assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_gpu_ternary_gemv_refuses_other_warpgroup_counts():
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  config = gemv.GemvConfig(block_k=2048, split_k=1, stages=2, warpgroups=3)
  x, w = jnp.zeros((8, 2048), jnp.int8), jnp.zeros((64, 128), jnp.uint32)
  with pytest.raises(ValueError, match="1 or 2 consumer warpgroups, got 3"):
    gpu.matmul(x, w, jnp.ones((8,)), jnp.ones((64,)), config=config, scaled=False,
               out_dtype=jnp.int32)


def test_gpu_ternary_gemv_register_split_fits_what_ptxas_allocates():
  # ptxas gives the 384-thread kernel (2 consumers) 168 registers a thread; a consumer's
  # `setmaxnreg.inc` past that pool never returns (how a 4-consumer variant hung).
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  producer, consumer = gemv._register_split(2)
  assert producer + 2 * consumer <= 3 * 168 and consumer >= 224
  producer, consumer = gemv._register_split(1)
  assert producer + consumer <= 2 * 248 and consumer == 256


def test_triton_gemm_only_with_an_explicit_config_that_fits():
  from bitgen.kernels import quantized_matmul_gpu as gpu
  x, w = jnp.zeros((40, 256), jnp.int8), jnp.zeros((96, 256), jnp.int8)
  ones = jnp.ones((40,), jnp.float32), jnp.ones((96,), jnp.float32)
  with pytest.raises(ValueError, match="N % block_n"):
    gpu.matmul(x, w, *ones, config=gpu.GemmConfig(block_n=64), scaled=False, out_dtype=jnp.int32,
               interpret=True)
  for config in (gpu.GemmConfig(block_n=32), gpu.GemmConfig(block_m=32, block_n=32, num_warps=4)):
    with pytest.raises(ValueError, match="scaled outputs were wrong"):  # M < block_m, or 4 warps
      gpu.matmul(x, w, *ones, config=config, scaled=True, out_dtype=jnp.float32, interpret=True)


def _assert_exact(got, exact, what):
  """Exact int32 equality; on failure, which rows and columns of the output are wrong."""
  got = np.asarray(got, np.int64)
  wrong = got != exact
  if wrong.any():
    rows, cols = np.nonzero(wrong)
    pytest.fail(f"{what}: {wrong.sum()} of {wrong.size} outputs wrong, max |error| "
                f"{np.abs(got - exact).max()}, rows {np.unique(rows)[:20]}, columns {np.unique(cols)[:40]}")


def _check_on_device(m, k, n, ternary, run, scaled=True):
  """`run(x, w, scales)` on the GPU against the host's int64 product (XLA's int8 dot is not trusted)."""
  rng = np.random.default_rng(m + n + ternary)
  x, w, w_int = _operands(rng, m, k, n, ternary)
  exact = np.asarray(x, np.int64) @ np.asarray(w_int, np.int64).T
  _assert_exact(run(x, w, None), exact, "int32 accumulator")
  if not scaled:
    return
  x_scale = rng.uniform(0.01, 1, (m,)).astype(np.float32)
  w_scale = rng.uniform(0.01, 1, (n,)).astype(np.float32)
  out = run(x, w, (jnp.asarray(x_scale), jnp.asarray(w_scale)))
  np.testing.assert_allclose(out, exact * x_scale[:, None].astype(np.float64) * w_scale, rtol=1e-6)


# Every GPU path `gpu` / `auto` routes to, on the device: int8 GEMV, Mosaic GEMM (int8 and unpacked
# ternary; odd M and N), then the ternary GEMV (never run before: if it hangs, the rest is reported).
DEVICE_SHAPES = [
    (8, 8192, 1024, False), (5, 2048, 6144, False), (16, 8192, 2048, False), (3, 2048, 96, False),
    (1, 2048, 200, False), (300, 1024, 512, False), (17, 1024, 96, False), (300, 1024, 512, True),
    (17, 1024, 96, True), (5, 1024, 200, True), (8, 8192, 1024, True), (5, 2048, 6144, True),
    (16, 8192, 2048, True), (3, 2048, 96, True), (1, 2048, 200, True)]


def _device_id(shape):
  from bitgen.kernels import quantized_matmul_gpu as gpu
  m, k, n, ternary = shape
  kernel = _gpu_kernel_name(gpu.default_config(m, k, n, ternary))
  return f"{'ternary' if ternary else 'int8'}-{kernel}-{m}x{k}x{n}"


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,ternary", DEVICE_SHAPES, ids=[_device_id(s) for s in DEVICE_SHAPES])
def test_gpu_routed_kernels_exact(m, k, n, ternary):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  _check_on_device(m, k, n, ternary, lambda x, w, scales: quantized_matmul(
      x, w, scales, out_dtype=None if scales is None else jnp.float32, implementation="gpu"))


# The Triton GEMM, explicit configs only: its block_n=256 default at the shape it passed on an H100,
# and the small tiles `gpu` routed (3, 2048, 96) to before: on an H200 their int32 accumulators were
# exact and their scaled outputs wrong (M < block_m, 4 warps), which the kernel now refuses.
TRITON_CASES = [(300, 1024, 512, 256, 8), (3, 2048, 96, 32, 4), (3, 2048, 128, 128, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,block_n,num_warps", TRITON_CASES)
def test_gpu_triton_gemm_explicit_config(m, k, n, block_n, num_warps):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  from bitgen.kernels import quantized_matmul_gpu as gpu
  config = gpu.GemmConfig(block_n=block_n, num_warps=num_warps)

  def run(x, w, scales):
    x_scale, w_scale = (jnp.ones((m,)), jnp.ones((n,))) if scales is None else scales
    return gpu.matmul(x, w, x_scale, w_scale, config=config, scaled=scales is not None,
                      out_dtype=jnp.float32 if scales is not None else jnp.int32)

  _check_on_device(m, k, n, False, run, scaled=m >= config.block_m and num_warps == 8)


@pytest.mark.gpu
@pytest.mark.parametrize("warpgroups", [1, 2])
@pytest.mark.parametrize("m,k,n,split_k", [(5, 4096, 200, 1), (8, 4096, 128, 2), (13, 2048, 64, 1)])
def test_gpu_ternary_gemv_variants(m, k, n, split_k, warpgroups):
  """The ternary GEMV with one or two consumer warpgroups, exact."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  config = gemv.GemvConfig(block_k=2048, split_k=split_k, stages=2, warpgroups=warpgroups)

  def run(x, w, scales):
    x_scale, w_scale = (jnp.ones((m,)), jnp.ones((n,))) if scales is None else scales
    return gpu.matmul(x, w, x_scale, w_scale, config=config, scaled=scales is not None,
                      out_dtype=jnp.float32 if scales is not None else jnp.int32)

  _check_on_device(m, k, n, True, run)
