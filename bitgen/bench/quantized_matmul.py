"""Benchmark: `quantized_matmul` (int8 and packed ternary weights) against XLA baselines.

    python -m bitgen.bench.quantized_matmul [--quick] [--sweep]

Rows per shape (M, K, N), all computing x[M, K] @ w[N, K]^T:
- xla_bf16: bf16 x bf16 dot;  xla_int8: int8 x int8 -> int32 dot (`preferred_element_type`) + scales;
- xla_dequant: int8 weights dequantized to bf16 in the graph, then a bf16 dot;
- xla_ternary_unpack: packed ternary unpacked to int8 in the graph, then the int8 dot;
- ours_int8 / ours_ternary: `quantized_matmul(..., implementation="auto")` on pre-quantized int8 x;
- qwix_int8: qwix's int8 dot, where qwix is installed;
- xla_read_int8_weights: a max over each row of the int8 weights (reads them once: the memory floor).
Timing: one jit runs the op over R distinct weight copies, each with its own x (so the weights come
from HBM, not L2, and no per-call work on x is shared between calls). **GPU time** is the number to
read: the kernels' own time per call (CUPTI, through Mosaic GPU's profiler: the sum of the jit's
kernels divided by R), with the Mosaic kernels' share beside it (the rest is XLA fusions around
them). "slope" is host time per call (the slope between a jit over 2 and over R copies, the median of
several trials): on the device it is dominated by per-call host costs of the jit and is no launch cost
of the kernels (RESULTS_quantized_matmul.md). Before timing, every kernel is checked exact against
the reference.
Needs only jax (no tfds/grain/ml_collections).
"""

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.kernels import ternary_pack
from bitgen.kernels.quantized_matmul import quantized_matmul

_NT = (((1,), (1,)), ((), ()))
WIDTH, MLP_RATIO = 2048, 4  # Infinity-2B


def _infinity_layers(m: int):
  w, h = WIDTH, WIDTH * MLP_RATIO
  return [(f"inf2b qkv M={m}", m, w, 3 * w), (f"inf2b proj M={m}", m, w, w),
          (f"inf2b fc1 M={m}", m, w, h), (f"inf2b fc2 M={m}", m, h, w)]


SHAPE_SETS = {
    "gemv": [("gemv M=8", 8, 8192, 8192)],
    "gemm": [("gemm 8192^3", 8192, 8192, 8192)],
    "inf2b_decode": _infinity_layers(8),
    "inf2b_prefill": _infinity_layers(4096),
}


def _time_per_call(fn, xs, weights, trials: int) -> tuple[float, float | None, float | None]:
  """Seconds per call of fn(x, w) over pairs of copies: (host slope, GPU time, Mosaic GPU time).

  slope: of the host time of one jit over 2 vs all copies; GPU time: the kernels' own time (CUPTI,
  the sum of the kernels of the jit over all copies divided by their number), and the part of it in
  Mosaic GPU kernels (None where CUPTI is unavailable).
  """
  def many(xs, ws):
    return [fn(x, w) for x, w in zip(xs, ws)]
  r0, r1 = 2, len(weights)
  jitted = jax.jit(many)
  times = {}
  for r in (r0, r1):
    args = xs[:r], weights[:r]
    jax.block_until_ready(jitted(*args))  # compile + warm up
    samples = []
    for _ in range(trials):
      start = time.perf_counter()
      jax.block_until_ready(jitted(*args))
      samples.append(time.perf_counter() - start)
    times[r] = statistics.median(samples)
  return (times[r1] - times[r0]) / (r1 - r0), *_gpu_time(jitted, xs, weights, trials)


def _gpu_time(jitted, xs, weights, trials: int) -> tuple[float | None, float | None]:
  """(all kernels, Mosaic GPU kernels) seconds per call, medians over `trials` runs of the jit."""
  try:
    from jax.experimental.mosaic.gpu import profiler
    _, runs = profiler.measure(jitted, aggregate=False, iterations=max(2, trials))(xs, weights)
  except Exception as e:  # no CUPTI (or not a GPU)
    print(f"no GPU time: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return None, None
  if runs is None:
    return None, None
  total = statistics.median(sum(ms for _, ms in run) for run in runs)
  mosaic = statistics.median(sum(ms for name, ms in run if "mosaic" in name) for run in runs)
  return total / 1e3 / len(weights), mosaic / 1e3 / len(weights)


def _implementations(m, k, n, scales, implementation):
  """label -> (fn(x, w), weight kind, activation kind)."""
  x_scale, w_scale = scales

  def scale(acc):
    return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :]).astype(jnp.bfloat16)

  def xla_int8(x, w):
    return scale(jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.int32))

  def ours(x, w):
    return quantized_matmul(x, w, scales, implementation=implementation)

  rows = {
      "xla_read_int8_weights": (lambda x, w: jnp.max(w, axis=1), "int8", "int8"),  # bandwidth floor
      "xla_bf16": (lambda x, w: jax.lax.dot_general(x, w, _NT), "bf16", "bf16"),
      "xla_int8": (xla_int8, "int8", "int8"),
      "xla_dequant": (lambda x, w: jax.lax.dot_general(
          x, (w.astype(jnp.float32) * w_scale[:, None]).astype(jnp.bfloat16), _NT), "int8", "bf16"),
      "xla_ternary_unpack": (lambda x, w: xla_int8(x, ternary_pack.unpack_ternary(w)), "ternary", "int8"),
      "ours_int8": (ours, "int8", "int8"),
      "ours_ternary": (ours, "ternary", "int8"),
  }
  try:
    import qwix  # optional baseline: the same int8 scheme (per-token x, per-channel w scales)
    rows["qwix_int8"] = (lambda x, w: qwix.dot_general(x, w, _NT), "qwix", "qwix")
  except ImportError:
    print("qwix not installed: no qwix row")
  return rows


def _operand(kind, shape, key):
  """Random operand of a kind: bf16, int8, ternary (packed), qwix (int8 QArray, per-row scales)."""
  if kind == "bf16":
    return jax.random.normal(key, shape, jnp.bfloat16)
  if kind == "qwix":
    import qwix
    return qwix.quantize(jax.random.normal(key, shape, jnp.float32), jnp.int8, channelwise_axes=(0,))
  if kind == "ternary":
    return ternary_pack.pack_ternary(jax.random.randint(key, shape, -1, 2, jnp.int8))
  return jax.random.randint(key, shape, -127, 128, jnp.int8)


def _weights(kind, n, k, copies, key):
  return [_operand(kind, (n, k), kk) for kk in jax.random.split(key, copies)]


def _check(m, k, n, seed, run, kinds=("int8", "ternary")):
  """Exact agreement of `run(x, w, scales)` with the host's product, on fresh data.

  The int32 accumulator (scales None) exactly; the f32 output with random scales to rtol 1e-6. At
  most 512 rows (the same kernel path as M); float64 BLAS is exact here (|sums| < 2^53).
  """
  rng = np.random.default_rng(seed)
  x = rng.integers(-128, 128, (min(m, 512), k), dtype=np.int8)
  x_scale = rng.uniform(0.01, 1, (x.shape[0],)).astype(np.float32)
  w_scale = rng.uniform(0.01, 1, (n,)).astype(np.float32)
  for kind in kinds:
    w = rng.integers(-1, 2, (n, k), dtype=np.int8) if kind == "ternary" else rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed = ternary_pack.pack_ternary(jnp.asarray(w)) if kind == "ternary" else jnp.asarray(w)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    if not np.array_equal(np.asarray(run(jnp.asarray(x), packed, None)), exact):
      raise AssertionError(f"int32 result differs from the exact product at {(m, k, n)}, {kind}")
    out = np.asarray(run(jnp.asarray(x), packed, (jnp.asarray(x_scale), jnp.asarray(w_scale))))
    want = exact * x_scale[:, None].astype(np.float64) * w_scale
    if not np.allclose(out, want, rtol=1e-6, atol=0):
      raise AssertionError(f"scaled result differs (rtol 1e-6) at {(m, k, n)}, {kind}: max rel "
                           f"{np.max(np.abs(out - want) / np.maximum(np.abs(want), 1e-30)):.2e}")


def _ours(implementation):
  """run(x, w, scales) for `_check`: quantized_matmul with f32 output when scaled."""
  def run(x, w, scales):
    return jax.jit(lambda x, w, s: quantized_matmul(
        x, w, s, out_dtype=None if s is None else jnp.float32, implementation=implementation))(x, w, scales)
  return run


def _warm_up(seconds: float = 2.0):
  """Busy the device for a while so clocks have ramped up before the first timing."""
  a = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(matmul(a))


def run(shapes, trials: int, copies: int, implementation: str = "auto"):
  _warm_up()
  key = jax.random.key(0)
  results = []
  for name, m, k, n in shapes:
    key, kx, kw = jax.random.split(key, 3)
    try:
      _check(m, k, n, m + k + n, _ours(implementation))
      wrong = ""
    except AssertionError as e:  # still timed (for debugging), but marked in every row of ours
      print(f"WRONG: {e}", flush=True)
      wrong = " (WRONG RESULT)"
    scales = (jnp.ones((m,), jnp.float32) / 127, jnp.ones((n,), jnp.float32) / 127)
    # Copies: far more bytes than L2 (50-60 MB) and enough work per jit that host jitter is small:
    # up to 4 GiB of bf16 weights, at most --copies.
    copies_here = max(4, min(copies, (4 << 30) // (2 * n * k)))
    weight_sets = {}
    for label, (fn, w_kind, x_kind) in _implementations(m, k, n, scales, implementation).items():
      if w_kind not in weight_sets:
        weight_sets[w_kind] = _weights(w_kind, n, k, copies_here, kw)
      xs = [_operand(x_kind, (m, k), kk) for kk in jax.random.split(kx, copies_here)]
      times = _time_per_call(fn, xs, weight_sets[w_kind], trials)
      label += wrong if label.startswith("ours") else ""
      results.append(_row(name, m, k, n, label, *times))
    del weight_sets
  return results


def sweep(trials: int, copies: int, sets=("gemv", "gemm")):
  """Times our GPU kernels over candidate configs at the headline shapes of `sets`, each checked exact
  first."""
  from bitgen.kernels import quantized_matmul_gpu as gpu
  from bitgen.kernels import quantized_matmul_gpu_gemm as mosaic_gemm
  from bitgen.kernels import quantized_matmul_gpu_gemv as gemv
  gemv_configs = {  # (block_k, split_k, stages[, consumer warpgroups]); split_k 1: one kernel
      "ternary": [(2048, 1, 3, 2), (2048, 1, 2, 2), (2048, 1, 4, 2), (2048, 1, 3, 1)],
      "int8": [(512, 1, 6)],
  }
  gemm_configs = [mosaic_gemm.GemmConfig(), mosaic_gemm.GemmConfig(wgmma_in_flight=0),
                  mosaic_gemm.GemmConfig(grid_tile_width=16)]
  cases = [((8, 8192, 8192), kind, [gemv.GemvConfig(*c) for c in configs])
           for kind, configs in gemv_configs.items() if "gemv" in sets]
  if "gemm" in sets:
    cases.append(((8192, 8192, 8192), "int8", gemm_configs))
  key = jax.random.key(1)
  results = []
  for (m, k, n), kind, configs in cases:
    copies_here = max(4, min(copies, (4 << 30) // (2 * n * k)))
    xs = [_operand("int8", (m, k), kk) for kk in jax.random.split(key, copies_here)]
    scales = jnp.ones((m,), jnp.float32) / 127, jnp.ones((n,), jnp.float32) / 127
    weights = _weights(kind, n, k, copies_here, key)
    for config in configs:
      def run(x, w, s, c=config):
        x_scale, w_scale = s if s is not None else (jnp.ones((x.shape[0],), jnp.float32),
                                                    jnp.ones((n,), jnp.float32))
        return jax.jit(lambda x, w, x_scale, w_scale: gpu.matmul(
            x, w, x_scale, w_scale, config=c, scaled=s is not None,
            out_dtype=jnp.float32 if s is not None else jnp.int32))(x, w, x_scale, w_scale)
      fn = lambda x, w, c=config: gpu.matmul(x, w, *scales, config=c, scaled=True, out_dtype=jnp.bfloat16)
      try:
        _check(m, k, n, 7, run, kinds=(kind,))
        wrong = ""
      except AssertionError as e:
        print(f"WRONG: {config}: {e}", flush=True)
        wrong = " (WRONG RESULT)"
      except Exception as e:  # a config the compiler rejects (e.g. too much shared memory)
        print(f"sweep {kind} {config}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      times = _time_per_call(fn, xs, weights, trials)
      results.append(_row(f"sweep {kind}", m, k, n, str(config) + wrong, *times))
    del weights
  return results


def _row(name, m, k, n, label, seconds, gpu_seconds, mosaic_seconds):
  """A result row (times in us, TOP/s from the GPU time where there is one), printed as it comes."""
  best = gpu_seconds if gpu_seconds else seconds
  us = lambda t: t * 1e6 if t is not None else float("nan")
  row = (name, m, k, n, label, us(seconds), us(gpu_seconds), us(mosaic_seconds),
         2 * m * k * n / best / 1e12)
  print(f"{name:24s} {label:20s} slope {row[5]:9.1f} us  GPU {row[6]:9.1f} us (Mosaic {row[7]:7.1f}) "
        f"{row[8]:8.1f} TOP/s", flush=True)
  return row


def markdown(results) -> str:
  device = jax.devices()[0].device_kind
  lines = [f"Device: {device}; jax {jax.__version__}; {datetime.date.today().isoformat()}", "",
           "| shape | M | K | N | implementation | slope (us) | GPU time (us) | of it Mosaic (us) | TOP/s |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, m, k, n, label, us, gpu_us, mosaic_us, tops in results:
    lines.append(f"| {name} | {m} | {k} | {n} | {label} | {us:.1f} | {gpu_us:.1f} | {mosaic_us:.1f} "
                 f"| {tops:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run, e.g. on CPU)")
  parser.add_argument("--trials", type=int, default=5)
  parser.add_argument("--copies", type=int, default=64, help="at most this many weight copies")
  parser.add_argument("--sweep", action="store_true",
                      help="also time candidate GPU configs (of the gemv / gemm sets in --shapes)")
  parser.add_argument("--sweep-only", action="store_true", help="only the --sweep configs")
  parser.add_argument("--shapes", default="gemv,gemm,inf2b_decode,inf2b_prefill",
                      help="comma-separated sets: " + ", ".join(SHAPE_SETS))
  args = parser.parse_args(argv)
  if args.quick:
    shapes = [("gemv", 8, 2048, 1024), ("gemm", 256, 512, 512)]
  else:
    shapes = [shape for name in args.shapes.split(",") for shape in SHAPE_SETS[name]]
  backend = jax.default_backend()
  implementation = backend if backend in ("gpu", "tpu") else "auto"  # a kernel, never a silent fallback
  results = sweep(args.trials, args.copies, args.shapes.split(",")) if args.sweep else []
  if not args.sweep_only:
    results += run(shapes, args.trials, args.copies, implementation)
  print()
  print(markdown(results))


if __name__ == "__main__":
  main()
