"""Benchmark: binary attention (prefill) and packed-cache decode against cuDNN / XLA baselines.

  python -m bitgen.bench.binary_attention [--quick] [--prefill-only] [--out table.md]
  python -m bitgen.bench.binary_attention --tune "qk_dtype=int8,bounded_softmax=0;h=128,causal=1"

Prefill: ours (`binary_attention`, kernel of this backend, binarisation included; the kernel alone
on pre-binarised inputs; and the kernel with 8-bit P V) vs `jax.nn.dot_product_attention` cuDNN and
XLA, bf16 forward.
Decode: one token over a 32k cache, packed keys (`binary_decode_attention`: the Pallas kernel and
the XLA popcount reference) vs a bf16 K/V cache decode in XLA. Accuracy: max / mean |err| of ours against the f32 binary reference and against
dense f32 attention on the unquantised inputs. Imports only jax (no data or config libraries).
"""

import argparse
import dataclasses
import datetime
import functools
import math
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.kernels import binary_attention as ba
from bitgen.kernels import binary_attention_gpu as bag
from bitgen.kernels import binary_decode as bd
from bitgen.kernels import binary_decode_gpu as bdg

PREFILL = [  # (B, T, N, H, causal)
    (4, 4096, 16, 64, False),
    (4, 4096, 16, 128, False),
    (1, 16384, 16, 64, True),
    (1, 16384, 16, 128, True),
]
DECODE_BATCHES = (8, 16, 32, 64)
DECODE_CACHE, DECODE_HEADS, DECODE_HEAD_DIM = 32768, 16, 128


def time_ms(fn, *args, calls=10, repeats=7) -> float:
  """Median wall time of one call: `calls` back-to-back dispatches per sample, then a sync."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls * 1e3)
  return float(np.median(samples))


def _try(fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # a baseline or kernel missing on this device: report, keep going
    traceback.print_exc()
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def _fmt(x, unit=""):
  return f"{x:.3f}{unit}" if isinstance(x, float) else str(x)


def bench_prefill(batch, length, heads, head_dim, causal, rows, accuracy):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys)
  mask = "causal" if causal else None
  flops = 4 * batch * heads * length * length * head_dim / (2 if causal else 1)

  ours = jax.jit(functools.partial(ba.binary_attention, mask=mask, implementation="pallas_gpu"))
  signs = jax.jit(lambda x: ba.binarize(x, "per_head"))
  qs, qsc = signs(q)
  ks, ksc = signs(k)
  kernel_only = jax.jit(functools.partial(bag.binary_attention_gpu, causal=causal))
  fp8_pv = jax.jit(functools.partial(bag.binary_attention_gpu, causal=causal,
                                     tuning=dataclasses.replace(bag.default_tuning(head_dim),
                                                               pv_fp8=True, skew_pv=False)))
  cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                    implementation="cudnn"))
  xla = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                  implementation="xla"))
  shape = f"B={batch} T={length} N={heads} H={head_dim}{' causal' if causal else ''}"
  # Baselines first: a failing kernel must not cost their numbers.
  for name, fn, args in [("cuDNN dot_product_attention", cudnn, (q, k, v)),
                         ("ours: binary_attention (pallas_gpu)", ours, (q, k, v)),
                         ("ours: kernel only (pre-binarised)", kernel_only,
                          (qs, qsc, ks, ksc, v, None)),
                         ("ours: kernel only, fp8 P V", fp8_pv, (qs, qsc, ks, ksc, v, None)),
                         ("XLA dot_product_attention", xla, (q, k, v))]:
    ms = _try(time_ms, fn, *args)
    tflops = flops / (ms * 1e-3) / 1e12 if isinstance(ms, float) else None
    rows.append((shape, name, _fmt(ms), "" if tflops is None else f"{tflops:.0f}"))
    print(rows[-1], flush=True)

  if length > 4096:  # the f32 references hold [B, N, T, S] scores: only at the smaller shapes
    return
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = jax.jit(functools.partial(ba.binary_attention_reference, mask=mask))(*f32)
  with jax.default_matmul_precision("highest"):
    dense = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal))(*f32)
  err = lambda a, b: f"{float(jnp.abs(a - b).max()):.2e} / {float(jnp.abs(a - b).mean()):.2e}"
  for name, fn, args in [("binary_attention (pallas_gpu)", ours, (q, k, v)),
                         ("kernel, fp8 P V", fp8_pv, (qs, qsc, ks, ksc, v, None))]:
    out = _try(lambda: fn(*args).astype(jnp.float32))
    if isinstance(out, str):
      accuracy.append((shape, name, out, "", "", ""))
    else:
      accuracy.append((shape, name, err(out, ref), err(out, dense), err(ref, dense),
                       f"{float(jnp.abs(dense).mean()):.2e}"))
    print(accuracy[-1], flush=True)


def _decode_inputs(batch):
  cache, heads, head_dim = DECODE_CACHE, DECODE_HEADS, DECODE_HEAD_DIM
  keys = jax.random.split(jax.random.key(batch), 3)
  q = jax.random.normal(keys[0], (batch, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, cache, heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, cache, heads, head_dim), jnp.bfloat16)
  lengths = jnp.full((batch,), cache, jnp.int32)
  return q, k, v, lengths


def bench_decode(batch, rows, accuracy):
  q, k, v, lengths = _decode_inputs(batch)
  k_bits, k_scale = jax.jit(bd.pack_signs)(k)
  kernel = jax.jit(functools.partial(bd.binary_decode_attention, implementation="pallas_gpu"))
  xla_packed = jax.jit(bd.binary_decode_attention_reference)
  kernel_ms = _try(time_ms, kernel, q, k_bits, k_scale, v, lengths)
  xla_ms = _try(time_ms, xla_packed, q, k_bits, k_scale, v, lengths)
  dense_ms = _try(time_ms, jax.jit(bd.dense_decode_attention), q, k, v, lengths)
  packed_bytes = k_bits.nbytes + k_scale.nbytes + v.nbytes
  dense_bytes = k.nbytes + v.nbytes
  ratio = lambda a, b: _fmt(b / a, "x") if isinstance(a, float) and isinstance(b, float) else ""
  gbs = lambda nbytes, ms: f"{nbytes / (ms * 1e-3) / 1e9:.0f}" if isinstance(ms, float) else ""
  rows.append((f"B={batch} S={DECODE_CACHE} N={DECODE_HEADS} H={DECODE_HEAD_DIM}",
               _fmt(kernel_ms), gbs(packed_bytes, kernel_ms), _fmt(xla_ms), gbs(packed_bytes, xla_ms),
               _fmt(dense_ms), gbs(dense_bytes, dense_ms), ratio(kernel_ms, dense_ms),
               ratio(xla_ms, dense_ms)))
  print(rows[-1], flush=True)
  if batch == DECODE_BATCHES[0]:
    out = _try(lambda: kernel(q, k_bits, k_scale, v, lengths).astype(jnp.float32))
    if isinstance(out, str):
      accuracy.append((rows[-1][0], out, "", ""))
    else:
      f32 = lambda x: x.astype(jnp.float32)
      ref = jax.jit(bd.binary_decode_attention_reference)(f32(q), k_bits, k_scale, f32(v), lengths)
      with jax.default_matmul_precision("highest"):
        dense = jax.jit(bd.dense_decode_attention)(f32(q), f32(k), f32(v), lengths)
      err = lambda a, b: f"{float(jnp.abs(a - b).max()):.2e} / {float(jnp.abs(a - b).mean()):.2e}"
      accuracy.append((rows[-1][0], err(out, ref), err(out, dense), err(ref, dense),
                       f"{float(jnp.abs(dense).mean()):.2e}"))
    print(accuracy[-1], flush=True)
  del k, v, k_bits


DECODE_SWEEP = [bdg.DecodeTuning(bs, chunk, warps, stages, heads)
                for bs, chunk, warps, stages, heads in [
                    (128, 1024, 4, 2, 1), (64, 1024, 4, 2, 1), (64, 1024, 4, 2, 2),
                    (32, 1024, 4, 2, 4), (32, 1024, 8, 2, 4), (64, 1024, 8, 2, 4),
                    (16, 1024, 4, 2, 8), (32, 2048, 4, 2, 2), (64, 2048, 4, 3, 2)]]


def decode_sweep():
  """Kernel-only ms of each DECODE_SWEEP tuning at B=8 and B=64 (a wrong config shows as error)."""
  for batch in (8, 64):
    q, k, v, lengths = _decode_inputs(batch)
    k_bits, k_scale = jax.jit(bd.pack_signs)(k)
    q_bits, q_scale = jax.jit(bd.pack_signs)(q)
    del k
    ref = jax.jit(bd.binary_decode_attention_reference)(q, k_bits, k_scale, v, lengths)
    for tuning in DECODE_SWEEP:
      fn = jax.jit(functools.partial(bdg.binary_decode_gpu, tuning=tuning))
      ms = _try(time_ms, fn, q_bits, q_scale, k_bits, k_scale, v, lengths)
      err = _try(lambda: float(jnp.abs(fn(q_bits, q_scale, k_bits, k_scale, v, lengths)
                                       .astype(jnp.float32) - ref.astype(jnp.float32)).max()))
      print(f"decode sweep B={batch} {tuning}: {_fmt(ms)} ms, max err vs XLA {err}", flush=True)


def parse_tuning(spec: str):
  """"key=value,..." -> (GpuTuning, shape options): GpuTuning fields (bools as 0/1) over the head
  dim's `default_tuning`, and the shape keys h (head dim, 64), causal (0), scale (input std, 1:
  larger values take the online-max path)."""
  fields = {f.name: f.type for f in dataclasses.fields(bag.GpuTuning)}
  tuning, shape = {}, {"h": 64, "causal": 0, "scale": 1.0}
  for item in filter(None, spec.split(",")):
    key, value = item.split("=")
    if key in shape:
      shape[key] = type(shape[key])(value)
    elif fields.get(key) in (bool, "bool"):
      tuning[key] = bool(int(value))
    elif fields.get(key) in (int, "int"):
      tuning[key] = int(value)
    elif key in fields:
      tuning[key] = value
    else:
      raise ValueError(f"unknown tuning key {key!r} (GpuTuning fields: {sorted(fields)}, or h, "
                       f"causal, scale)")
  return dataclasses.replace(bag.default_tuning(shape["h"]), **tuning), shape


def tune(spec: str):
  """One tuning at B=4 T=4096 N=16: kernel-only ms and max / mean |err| against the f32 binary
  reference on batch 0 (a wrong config shows here)."""
  tuning, shape = parse_tuning(spec)
  head_dim, causal = shape["h"], bool(shape["causal"])
  keys = jax.random.split(jax.random.key(head_dim), 3)
  q, k, v = (jax.random.normal(key, (4, 4096, 16, head_dim), jnp.float32) for key in keys)
  q, k = shape["scale"] * q, shape["scale"] * k
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  qs, qsc = ba.binarize(q, "per_head")
  ks, ksc = ba.binarize(k, "per_head")
  fn = jax.jit(functools.partial(bag.binary_attention_gpu, causal=causal, tuning=tuning))
  ms = time_ms(fn, qs, qsc, ks, ksc, v, None)
  out = fn(qs, qsc, ks, ksc, v, None)[:1].astype(jnp.float32)
  f32 = [x[:1].astype(jnp.float32) for x in (q, k, v)]
  ref = ba.binary_attention_reference(*f32, mask="causal" if causal else None)
  err = jnp.abs(out - ref)
  print(f"tune [{spec}] H={head_dim} causal={causal}: {ms:.3f} ms, max err {float(err.max()):.2e}"
        f", mean err {float(err.mean()):.2e}", flush=True)


def _table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="first prefill shape, decode B=8 only")
  parser.add_argument("--out", help="also write the markdown tables to this file")
  parser.add_argument("--tune", help="time GPU kernel tunings: key=value,... (GpuTuning fields, "
                      "h, causal, scale; several separated by ';')")
  parser.add_argument("--prefill-only", action="store_true", help="skip the decode tables")
  parser.add_argument("--decode-only", action="store_true", help="skip the prefill tables")
  parser.add_argument("--decode-sweep", action="store_true", help="time DECODE_SWEEP tunings")
  args = parser.parse_args(argv)
  if args.tune is not None:  # "" is the default tuning
    for spec in args.tune.split(";"):
      _try(tune, spec)
    return
  if args.decode_sweep:
    return decode_sweep()
  device = jax.devices()[0]
  header = (f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
            f"date {datetime.date.today().isoformat()}")
  print(header, flush=True)
  prefill, accuracy, decode, decode_accuracy = [], [], [], []
  for batch in [] if args.prefill_only else DECODE_BATCHES[:1] if args.quick else DECODE_BATCHES:
    bench_decode(batch, decode, decode_accuracy)
  for config in [] if args.decode_only else PREFILL[:1] if args.quick else PREFILL:
    bench_prefill(*config, prefill, accuracy)
  text = "\n\n".join([
      header,
      "Prefill, bf16 forward (ms: median of 7 samples of 10 back-to-back calls; TFLOP/s counts "
      "4*B*N*T*S*H, halved for causal):",
      _table(("shape", "implementation", "ms", "TFLOP/s"), prefill),
      "Accuracy (bf16 inputs; max / mean |difference|; 'dense' = f32 softmax attention on the "
      "unquantised q, k):",
      _table(("shape", "ours", "ours vs f32 binary reference", "ours vs dense",
              "f32 binary reference vs dense", "mean |dense|"), accuracy),
      "Decode, one token over a full cache, bf16 V (GB/s counts the cache bytes read once; "
      "speedups over the bf16 K/V XLA decode):",
      _table(("shape", "ours: Pallas kernel ms", "GB/s", "ours: XLA popcount ms", "GB/s",
              "bf16 K/V XLA ms", "GB/s", "kernel speedup", "XLA popcount speedup"), decode),
      "Decode accuracy (bf16 q, V; max / mean |difference|; 'dense' = f32 softmax decode on the "
      "unquantised q, k):",
      _table(("shape", "kernel vs f32 binary reference", "kernel vs dense",
              "f32 binary reference vs dense", "mean |dense|"), decode_accuracy),
  ])
  print("\n" + text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
