"""Binary attention: official BinaryAttention fixture, every CPU-runnable implementation vs the
reference (forward and gradients, masks, odd shapes), fallback rules, sign packing."""

import dataclasses
import functools
import importlib.util
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity

from bitgen.kernels import _binarize
from bitgen.kernels import binary_attention as ba
from bitgen.kernels import binary_attention_gpu as ba_gpu
from bitgen.kernels import binary_attention_tpu as ba_tpu
from bitgen.kernels.binary_attention import binary_attention, binary_attention_reference
from bitgen.nn.attention import attention
from bitgen.quantizers import bits as bits_lib

TOL = dict(atol=1e-5, rtol=1e-4)


def _qkv(key, shape, dtype=jnp.float32, kv_len=None):
  kq, kk, kv = jax.random.split(key, 3)
  kv_shape = shape if kv_len is None else (shape[0], kv_len, *shape[2:])
  # Scale 0.8: about a quarter of the entries land beyond the STE clip |x| > 1.
  return (0.8 * jax.random.normal(kq, shape, dtype), 0.8 * jax.random.normal(kk, kv_shape, dtype),
          jax.random.normal(kv, kv_shape, dtype))


# ------------------------------------------------------------------------------ official fixture


@pytest.fixture(scope="module")
def fixture():
  io = load_parity("binary_attention", "io.npz")
  return io, load_parity("binary_attention", "weights.npz")


def test_ste_sign_matches_official_probe(fixture):
  io, _ = fixture
  x = jnp.asarray(io["ste_probe/x"])
  sign, grad = jax.value_and_grad(lambda x: ba.binarize(x[None, :, None, None], "per_head")[0].sum())(x)
  np.testing.assert_array_equal(ba.binarize(x[None, :, None, None], "per_head")[0][0, :, 0, 0],
                                io["ste_probe/sign"])
  np.testing.assert_array_equal(grad, io["ste_probe/grad"])


def _module_forward(weights, x, implementation, heads=2):
  """The official DeiT `Attention` block (qk_only variant) in our [B, T, N, H] layout."""
  batch, tokens, channels = x.shape
  qkv = x @ weights["qkv.weight"].T + weights["qkv.bias"]
  qkv = qkv.reshape(batch, tokens, 3, heads, channels // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  table = weights["relative_position_bias_table"]
  bias = jnp.transpose(table[weights["relative_position_index"].reshape(-1)].reshape(
      tokens, tokens, heads), (2, 0, 1))[None]  # [1, N, T, S]
  out = binary_attention(q, k, v, bias=bias, implementation=implementation)
  return out.reshape(batch, tokens, channels) @ weights["proj.weight"].T + weights["proj.bias"]


@pytest.mark.parametrize("implementation", ["reference", "auto"])
def test_matches_official_qk_only(fixture, implementation):
  io, weights = fixture
  weights = {name: jnp.asarray(w) for name, w in weights.items()}
  x, grad_out = jnp.asarray(io["x"]), jnp.asarray(io["grad_out"])
  out, vjp = jax.vjp(lambda x: _module_forward(weights, x, implementation), x)
  np.testing.assert_allclose(out, io["qk_only/out"], **TOL)
  (grad_x,) = vjp(grad_out)
  np.testing.assert_allclose(grad_x, io["qk_only/grad_x"], **TOL)


def test_quantiser_gradient_matches_official(fixture):
  """d out / d q_pre through the scale path and the clipped STE, from the fixture's d/d q_hat."""
  io, _ = fixture
  to_ours = lambda a: jnp.transpose(jnp.asarray(a), (0, 2, 1, 3))  # [B, N, T, H] -> [B, T, N, H]
  for name in ("q", "k"):
    pre = to_ours(io[f"qk_only/{name}_pre"])
    hat, vjp = jax.vjp(lambda x: ba.binarize(x, "per_head")[0] * ba.binarize(x, "per_head")[1], pre)
    np.testing.assert_allclose(hat, to_ours(io[f"qk_only/{name}_hat"]), **TOL)
    np.testing.assert_allclose(ba.binarize(pre, "per_head")[1][:, 0, :, 0],
                               io[f"qk_only/{name}_scale"][:, :, 0, 0], **TOL)
    (grad,) = vjp(to_ours(io[f"qk_only/grad_{name}_hat"]))
    np.testing.assert_allclose(grad, to_ours(io[f"qk_only/grad_{name}_pre"]), **TOL)


# -------------------------------------------------------------- implementations vs the reference

MASKS = {
    "none": lambda t: None,
    "causal": lambda t: "causal",
    # Infinity's next-scale pattern: 3 scales of unequal length, each sees itself and earlier ones.
    "block_causal": lambda t: jnp.repeat(jnp.arange(3), np.array([t // 4, t // 4, t - 2 * (t // 4)]),
                                         total_repeat_length=t),
    # The same scales in reverse order: early queries see no key of the first blocks.
    "reverse_block_causal": lambda t: MASKS["block_causal"](t)[::-1],
}


def _check_against_reference(implementation, shape, mask, scale_mode, dtype, atol):
  q, k, v = _qkv(jax.random.key(hash((shape, mask, scale_mode)) % 2**31), shape, dtype)
  m = MASKS[mask](shape[1])
  g = jax.random.normal(jax.random.key(7), shape, jnp.float32).astype(dtype)
  # One vjp per implementation: the kernel runs once (interpreted kernels are slow on CPU).
  got, got_vjp = jax.vjp(lambda q, k, v: binary_attention(
      q, k, v, mask=m, scale_mode=scale_mode, implementation=implementation), q, k, v)
  want, want_vjp = jax.vjp(lambda q, k, v: binary_attention_reference(
      q, k, v, mask=m, scale_mode=scale_mode), *(x.astype(jnp.float32) for x in (q, k, v)))
  assert got.dtype == dtype and got.shape == shape
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol, rtol=0)
  for got_g, want_g in zip(got_vjp(g), want_vjp(g.astype(jnp.float32))):
    np.testing.assert_allclose(np.asarray(got_g, np.float32), want_g, atol=atol * 10, rtol=0)


@pytest.mark.parametrize("mask,scale_mode", [("none", "per_head"), ("causal", "per_token"),
                                             ("block_causal", "per_head"),
                                             ("block_causal", "per_token")])
def test_tpu_kernel_interpreted_matches_reference(mask, scale_mode):
  # T = 200 is no multiple of the 128-token blocks: exercises the padded-key masking too.
  _check_against_reference("pallas_tpu", (1, 200, 2, 64), mask, scale_mode, jnp.float32, 1e-5)


def test_tpu_kernel_interpreted_bf16_head_dim_128():
  _check_against_reference("pallas_tpu", (2, 128, 1, 128), "causal", "per_head", jnp.bfloat16, 2e-2)


def test_tpu_kernel_several_blocks_skip_masked_blocks():
  blocks = ba_tpu.TpuBlockSizes(block_q=128, block_kv=128)
  shape = (1, 384, 1, 64)
  q, k, v = _qkv(jax.random.key(3), shape)
  qs, qsc = ba.binarize(q, "per_token")
  ks, ksc = ba.binarize(k, "per_token")
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(3), 128), (1, 384))
  got = ba_tpu.binary_attention_tpu(qs, qsc, ks, ksc, v, seg, causal=False, blocks=blocks, interpret=True)
  want = binary_attention_reference(q, k, v, mask=seg[0], scale_mode="per_token")
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_reference_and_auto_agree_with_dense_attention_on_binary_inputs():
  """On inputs that are already s * sign, binary attention is plain softmax attention."""
  q, k, v = _qkv(jax.random.key(1), (2, 16, 2, 64))
  q, k = 0.3 * jnp.sign(q), 0.7 * jnp.sign(k)
  dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  for implementation in ("reference", "auto"):
    got = binary_attention(q, k, v, mask="causal", implementation=implementation)
    np.testing.assert_allclose(got, dense, atol=1e-5)


def test_dense_boolean_mask_and_bias_reach_the_reference():
  q, k, v = _qkv(jax.random.key(2), (1, 8, 2, 64), kv_len=12)
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (1, 2, 8, 12)).at[..., 0].set(True)
  bias = jax.random.normal(jax.random.key(4), (1, 2, 8, 12))
  got = binary_attention(q, k, v, bias=bias, mask=mask)
  qs, qsc = ba.binarize(q, "per_head")
  ks, ksc = ba.binarize(k, "per_head")
  want = jax.nn.dot_product_attention(qs * qsc, ks * ksc, v, bias=bias, mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_falls_back_with_a_logged_reason(caplog, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  q, k, v = _qkv(jax.random.key(5), (1, 16, 2, 32))  # head dim 32: no kernel
  with caplog.at_level(logging.WARNING, logger=ba.__name__):
    got = binary_attention(q, k, v)
  assert "head dim 32" in caplog.text
  np.testing.assert_allclose(got, binary_attention_reference(q, k, v), atol=1e-6)


def test_forced_kernel_refuses_unsupported_inputs():
  q, k, v = _qkv(jax.random.key(6), (1, 16, 2, 32))
  with pytest.raises(ValueError, match="head dim 32"):
    binary_attention(q, k, v, implementation="pallas_tpu")
  q, k, v = _qkv(jax.random.key(6), (1, 16, 2, 64))
  with pytest.raises(ValueError, match="bias"):
    binary_attention(q, k, v, bias=jnp.zeros((1, 2, 16, 16)), implementation="pallas_tpu")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="CUDA GPU"):
      binary_attention(q, k, v, implementation="pallas_gpu")


def test_nn_attention_binary_kind_is_binary_attention():
  q, k, v = _qkv(jax.random.key(10), (1, 16, 2, 64))
  segments = jnp.repeat(jnp.arange(2), 8)
  np.testing.assert_array_equal(attention(q, k, v, mask=segments, kind="binary"),
                                binary_attention(q, k, v, mask=segments))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scale_mode="per_row"), ValueError, "scale_mode"),
    (dict(implementation="cuda"), ValueError, "implementation"),
    (dict(mask="full"), ValueError, "'causal'"),
    (dict(mask=jnp.zeros((3, 16), jnp.int32)), ValueError, "segment ids"),
    (dict(mask=jnp.zeros((16,), jnp.float32)), TypeError, "mask"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, error, match):
  q, k, v = _qkv(jax.random.key(8), (1, 16, 2, 64))
  with pytest.raises(error, match=match):
    binary_attention(q, k, v, **kwargs)


def test_bad_shapes_raise():
  q, k, v = _qkv(jax.random.key(9), (1, 16, 2, 64))
  with pytest.raises(ValueError, match=r"\[B, T, N, H\]"):
    binary_attention(q[0], k, v)
  with pytest.raises(ValueError, match="disagree"):
    binary_attention(q, k[..., :32], v)


# ------------------------------------------------------------------------------------ sign bits


@pytest.mark.parametrize("head_dim", [32, 64, 100, 128])
def test_pack_unpack_signs_round_trip(head_dim):
  x = jax.random.normal(jax.random.key(head_dim), (3, 5, head_dim)).at[0, 0, :4].set(
      jnp.array([0.0, -0.0, 1e-30, -1e-30]))
  words, scale = ba.pack_signs(x)
  assert words.dtype == jnp.uint32 and words.shape == (3, 5, -(-head_dim // 32))
  np.testing.assert_allclose(scale, jnp.abs(x).mean(-1), rtol=1e-6)
  signs = ba.unpack_signs(words, head_dim)
  np.testing.assert_array_equal(signs, ba.binarize(x[None], "per_token")[0][0])
  np.testing.assert_array_equal(signs[0, 0, :4], [1, 1, 1, -1])  # sign(0) = sign(-0.0) = +1
  # Bit order "lsb": element d is bit d % 32 of word d // 32.
  np.testing.assert_array_equal((words[..., 0] >> 3) & 1, (x[..., 3] >= 0).astype(np.uint32))


def test_pack_signs_differs_from_bits_convention_only_at_zero():
  x = jnp.array([[-2.0, -0.0, 0.0, 0.5]])
  words, _ = ba.pack_signs(x)
  assert int(words[0, 0]) == 0b1110  # sign(0) = +1 here
  assert int(bits_lib.pack_bits(bits_lib.signs_to_bits(x), order="lsb")[0, 0]) == 0b1000  # BSQ


# ------------------------------------------------------------ real TPU compile, GPU on device


def _tpu_topology(name):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install libtpu): cannot compile for a TPU topology")
  # Compile-only use: do not contend for libtpu's one-process lockfile with other jax processes.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(name, "tpu")


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("mask", ["none", "causal"])
def test_tpu_kernel_compiles_for_real_generations(topology, mask, monkeypatch):
  device = _tpu_topology(topology).devices[0]
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # "auto" picks the compiled kernel
  shape = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16,
                               sharding=jax.sharding.SingleDeviceSharding(device))
  m = MASKS[mask](1024)
  fn = jax.jit(lambda q, k, v: binary_attention(q, k, v, mask=m))
  compiled = fn.trace(shape, shape, shape).lower(lowering_platforms=("tpu",)).compile()
  assert "tpu_custom_call" in compiled.as_text()


# ------------------------------------------------------------------------ GPU kernel pieces on CPU


def test_gpu_polynomial_exp2_is_accurate():
  x = jnp.concatenate([-jnp.linspace(0, 125, 100_001), jnp.array([-jnp.inf, -1e30])])
  got = np.asarray(ba_gpu._exp2_fma(x), np.float64)
  want = np.exp2(np.asarray(x, np.float64))
  assert np.all(got >= 0) and np.all(got[-2:] <= 2.0**-125)
  np.testing.assert_allclose(got[:-2], want[:-2], rtol=1e-4, atol=0)


def test_gpu_bound_applies_only_where_exp2_cannot_underflow():
  shape = (2, 256, 2, 64)
  q, k, _ = _qkv(jax.random.key(11), shape)
  q = q.at[1].multiply(30.0)  # batch 1: scores up to H * s_q s_k / sqrt(H) ~ 200 (log2 units)
  for mode in ("per_head", "per_token"):
    (_, q_scale), (_, k_scale) = ba.binarize(q, mode), ba.binarize(k, mode)
    for p_dtype, limit in ((jnp.bfloat16, 100.0), (jnp.float8_e4m3fn, 14.0)):
      consts, vectors = ba_gpu._gpu_factors(q_scale, k_scale, p_dtype, jnp.float32(1), 2, 256, 256, 2,
                                        64)
      assert consts.shape == (2, 2, 32) and (vectors is None) == (mode == "per_head")
      # The shift bounds every logit: H * factor (per token: H * max over the tile's factors).
      row, col = _binarize.kernel_factors(q_scale, k_scale, 2, 256, 256, 2, 64)
      largest = 64 * np.log2(np.e) * (row.max(-1) * col.max(-1))  # [B, N]
      np.testing.assert_allclose(consts[..., 1], largest, rtol=1e-5)
      np.testing.assert_array_equal(consts[..., 2], 2 * largest <= limit)
      assert consts[0, :, 2].all() or p_dtype == jnp.float8_e4m3fn
      assert not consts[1, :, 2].any()


@pytest.mark.parametrize("tuning,mask,scale_mode", [
    (ba_gpu.GpuTuning(), "causal", "per_token"),
    (ba_gpu.GpuTuning(qk_dtype="int8", bounded_softmax=False, schedule_barrier=False), "none",
     "per_head"),
    (ba_gpu.GpuTuning(pv_fp8=True, poly_exp_cols=32), "none", "per_head"),
    (ba_gpu.GpuTuning(bounded_softmax=False), "block_causal", "per_token"),
])
def test_gpu_kernel_lowers_for_cuda_on_cpu(tuning, mask, scale_mode):
  """The Mosaic GPU kernel traces and lowers (no GPU needed): catches API drift in CI."""
  shape = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((1, 256 if scale_mode == "per_token" else 1, 2, 1), jnp.float32)
  segments = jax.ShapeDtypeStruct((1, 256), jnp.int32) if mask == "block_causal" else None
  fn = jax.jit(functools.partial(ba_gpu.binary_attention_gpu, causal=mask == "causal", tuning=tuning))
  text = fn.trace(shape, scale, shape, scale, shape, segments).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("mask", ["none", "causal", "block_causal"])
def test_gpu_default_tuning_lowers_at_ragged_lengths(mask):
  """H=64 runs three compute warpgroups (192 rows a CTA): at T=256 the last CTA has two spare."""
  assert ba_gpu.default_tuning(64).compute_wgs == 3
  shape = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((1, 1, 2, 1), jnp.float32)
  segments = jax.ShapeDtypeStruct((1, 256), jnp.int32) if mask == "block_causal" else None
  fn = jax.jit(functools.partial(ba_gpu.binary_attention_gpu, causal=mask == "causal"))
  text = fn.trace(shape, scale, shape, scale, shape, segments).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_gpu_tuning_refuses_bad_warpgroup_schedules():
  q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  scale = jnp.ones((1, 1, 1, 1), jnp.float32)
  for tuning in (ba_gpu.GpuTuning(compute_wgs=4, schedule_barrier=False),
                 ba_gpu.GpuTuning(compute_wgs=3, schedule_barrier=True),
                 ba_gpu.GpuTuning(skew_pv=True, schedule_barrier=True)):
    with pytest.raises(ValueError, match="compute_wgs|skew_pv"):
      ba_gpu.binary_attention_gpu(q, scale, q, scale, q, None, causal=False, tuning=tuning)


# ------------------------------------------------------------------------------ GPU on device


def _check_gpu_tuning(tuning, shape, mask, scale_mode, atol, input_scale=1.0):
  """atol for bf16 P V; fp8 P V adds e4m3's rounding of V (2^-4 relative, all of an output row's
  error where a causal row sees one key) and of P."""
  q, k, v = _qkv(jax.random.key(12), shape)
  if tuning.pv_fp8:
    atol += 2.0**-4 * float(jnp.abs(v).max())
  q, k = input_scale * q, input_scale * k
  (qs, qsc), (ks, ksc) = ba.binarize(q, scale_mode), ba.binarize(k, scale_mode)
  v16 = v.astype(jnp.bfloat16)
  m = MASKS[mask](shape[1])
  segments = jnp.broadcast_to(m, shape[:2]) if "block_causal" in mask else None
  got = ba_gpu.binary_attention_gpu(qs, qsc, ks, ksc, v16, segments, causal=mask == "causal",
                                    tuning=tuning)
  want = binary_attention_reference(q, k, v16.astype(jnp.float32), mask=m, scale_mode=scale_mode)
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
  assert err.max() <= atol, (tuning, float(err.max()), float(err.mean()))


@pytest.mark.gpu
@pytest.mark.parametrize("tuning,atol", [
    (ba_gpu.GpuTuning(qk_dtype="int8"), 2e-2),
    (ba_gpu.GpuTuning(bounded_softmax=False), 2e-2),
    (ba_gpu.GpuTuning(schedule_barrier=False), 2e-2),
    (ba_gpu.GpuTuning(poly_exp_cols=32), 2e-2),
    (ba_gpu.GpuTuning(compute_wgs=3, schedule_barrier=False), 2e-2),
    (ba_gpu.GpuTuning(compute_wgs=2, schedule_barrier=True), 2e-2),  # the ping-pong kernel at H=64
    (ba_gpu.GpuTuning(compute_wgs=3, schedule_barrier=False, skew_pv=True), 2e-2),
    (ba_gpu.GpuTuning(pv_fp8=True), 2e-2),
])
@pytest.mark.parametrize("mask,scale_mode", [("none", "per_head"), ("causal", "per_token"),
                                             ("block_causal", "per_token")])
def test_gpu_kernel_tunings_match_reference(tuning, atol, mask, scale_mode):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  _check_gpu_tuning(tuning, (1, 512, 2, 64), mask, scale_mode, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["causal", "block_causal", "reverse_block_causal"])
@pytest.mark.parametrize("pv_fp8", [False, True])
def test_gpu_kernel_large_scores_take_the_online_max(pv_fp8, mask):
  """Scores up to ~400 (log2 units): the bound would underflow, the kernel must use the running max."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  _check_gpu_tuning(ba_gpu.GpuTuning(pv_fp8=pv_fp8), (1, 256, 2, 64), mask, "per_head", 2e-2,
                    input_scale=30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["none", "causal", "block_causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_kernel_matches_reference(mask, head_dim):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  with jax.default_matmul_precision("highest"):
    _check_against_reference("pallas_gpu", (2, 512, 2, head_dim), mask, "per_head", jnp.bfloat16,
                             2e-2)
    _check_against_reference("pallas_gpu", (1, 256, 2, head_dim), mask, "per_token",
                             jnp.bfloat16, 2e-2)
