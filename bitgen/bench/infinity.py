"""Benchmark: Infinity sampling (transformer + VAE decode) and the training step, vs the official.

    python -m bitgen.bench.infinity                      # the issue's table (GPU; random weights)
    python -m bitgen.bench.infinity --tiny --trials 1    # a CPU smoke run of every row at tiny sizes

Rows (the issue's): infinity_2b at 256^2 (7 scales) batch 1 and 8, at 1024^2 (13 scales) batch 1
and 8; layer12 at 256^2 batch 8; the layer12 training step at 256^2 batch 8. Random weights,
bfloat16 compute.

Sampling = `bitgen.sample.next_scale.generate` on `next_scale.prepare(model, bfloat16)` (one
jitted program per schedule and batch: blocks scanned, KV cache allocated once inside, cuDNN
flash attention), then `vae.decode` of the summed latent (a second jitted program, d32 VAE in
bfloat16). Settings of the official 2B script: CFG 3 (the batch is doubled), tau 0.5, top-k 900
(a no-op on 2 logits per bit), top-p 0.97, text features (B, 64, 2048) with lengths 64. Time per
batch is the median of `trials` calls after a warm-up (compile) call, on the device
(`block_until_ready`); s/image = batch time / batch; the split reports the two programs.

Training step = `infinity_loss.training_loss` (frozen d32 VAE encode of 256^2 images, bitwise
self-correction, text condition with 10% dropout, scale-reweighted bit loss), its gradient, clip
and AdamW (official betas 0.9/0.97, weight decay 0.005), float32 master weights cast to bfloat16
for the forward/backward (autocast-like), state buffers donated. MFU = XLA's flop count of the
lowered step (every dot and convolution, the VAE encode included) / step time / the chip's dense
bf16 peak.

Peak memory = `device.memory_stats()["peak_bytes_in_use"]` after the row (a process-wide high-water
mark: rows run in increasing memory order, so each 2B row's value is its own peak).

The official numbers (PyTorch FoundationVision/Infinity, SDPA attention, bf16, on an H100) are
quoted from the project issue; they are not re-run here.
"""

import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bitgen import configlib
from bitgen.models import infinity_loss
from bitgen.models import infinity_schedules as schedules
from bitgen.models.infinity import Infinity, InfinityConfig
from bitgen.models.infinity_vae import InfinityVAE, InfinityVAEConfig
from bitgen.sample import next_scale
from configs import infinity as configs

# Row -> (official value, unit) quoted from the issue.
OFFICIAL = {
    "2b 256 b1": (0.454, "s/image"), "2b 256 b8": (13.7, "images/s"),
    "2b 1024 b1": (1.09, "s/image"), "2b 1024 b8": (1.96, "images/s"),
    "layer12 256 b8": (38.1, "images/s"), "layer12 train 256 b8": (0.171, "s/step"),
}
OFFICIAL_PEAK_GIB = {"2b 1024 b8": 71.7}
TARGET_SPEEDUP = 2.0
TARGET_PEAK_GIB = {"2b 1024 b8": 40.0}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
TEXT_TOKENS = 64
SAMPLING = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97)

# name -> (model variant, pn, batch, "sample" | "train"); cheap rows first, 2B rows by memory.
ROWS = {
    "layer12 256 b8": ("layer12", "0.06M", 8, "sample"),
    "layer12 train 256 b8": ("layer12", "0.06M", 8, "train"),
    "2b 256 b1": ("2b", "0.06M", 1, "sample"),
    "2b 256 b8": ("2b", "0.06M", 8, "sample"),
    "2b 1024 b1": ("2b", "1M", 1, "sample"),
    "2b 1024 b8": ("2b", "1M", 8, "sample"),
}
# --tiny: the same rows on the tiny model and VAE at 3 scales (64^2), for a CPU smoke run.
TINY_SCALES = 3


def _model_configs(variant: str, tiny: bool) -> tuple[InfinityConfig, InfinityVAEConfig]:
  config = configs.get_config("tiny" if tiny else variant)
  return (configlib.from_dict(InfinityConfig, config.model),
          configlib.from_dict(InfinityVAEConfig, config.vae))


def _schedule(pn: str, tiny: bool) -> schedules.Schedule:
  schedule = schedules.schedule_for(1.0, pn)
  return schedule.prefix(TINY_SCALES) if tiny else schedule


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _text(config: InfinityConfig, batch: int, key: jax.Array):
  tokens = min(TEXT_TOKENS, config.text_maxlen)
  text = jax.random.normal(key, (batch, tokens, config.text_channels), jnp.bfloat16)
  return text, jnp.full((batch,), tokens, jnp.int32)


_START = time.perf_counter()


def _progress(message: str) -> None:
  print(f"#   [{time.perf_counter() - _START:6.1f} s] {message}", flush=True)


def _median_time(fn, trials: int) -> tuple[float, float]:
  """(median seconds of `trials` calls after the first, first-call seconds incl. compile)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(0))
  first = time.perf_counter() - start
  times = []
  for i in range(trials):
    start = time.perf_counter()
    jax.block_until_ready(fn(i + 1))
    times.append(time.perf_counter() - start)
  return statistics.median(times), first


def random_module(build, seed: int, dtype=jnp.float32) -> nnx.Module:
  """The module `build()` makes, with N(0, 0.02^2) floating variables in `dtype` (integer ones 0).

  Not the models' own initialisers: jitting those for a 2B model took 90-120 s of compile on the
  device (the first measured run); this compiles one tiny program per distinct shape. Speed does
  not depend on the values.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = [(0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(dtype)
            if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype)
            for k, a in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


def _peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


class Models:
  """Random-weight models, built once per variant: the prepared bf16 transformer and bf16 VAE."""

  def __init__(self, tiny: bool):
    self.tiny, self.variant, self.weights, self.vae, self.config = tiny, None, None, None, None

  def release(self):
    self.variant = self.weights = self.vae = self.config = None
    gc.collect()

  def get(self, variant: str):
    if variant != self.variant:
      self.release()
      config, vae_config = _model_configs(variant, self.tiny)
      _progress(f"building {variant}")
      model = random_module(lambda: Infinity(config, rngs=nnx.Rngs(0)), 0, jnp.bfloat16)
      self.weights = next_scale.prepare(model)
      del model
      self.vae = random_module(lambda: InfinityVAE(vae_config, rngs=nnx.Rngs(1)), 1, jnp.bfloat16)
      self.variant, self.config = variant, config
      gc.collect()
      jax.block_until_ready(self.weights.blocks)
      _progress(f"built {variant}")
    return self.config, self.weights, self.vae


def bench_sampling(models: Models, variant: str, pn: str, batch: int, trials: int) -> dict:
  config, weights, vae = models.get(variant)
  schedule = _schedule(pn, models.tiny)
  text, lengths = _text(config, batch, jax.random.key(1))
  decode = nnx.jit(lambda vae, latent: vae.decode(latent.astype(jnp.bfloat16)))

  def transformer(i):
    return next_scale.generate(weights, schedule, jax.random.key(i), text=text, text_lengths=lengths,
                               **SAMPLING).latent

  t_transformer, first_transformer = _median_time(transformer, trials)
  _progress(f"transformer {t_transformer:.3f} s (first call {first_transformer:.1f} s)")
  latent = transformer(0)
  t_decode, first_decode = _median_time(lambda i: decode(vae, latent), trials)
  total = t_transformer + t_decode
  return {"batch_s": total, "s_per_image": total / batch, "images_per_s": batch / total,
          "transformer_s": t_transformer, "decode_s": t_decode,
          "compile_s": first_transformer + first_decode, "peak_gib": _peak_gib()}


def bench_training(models: Models, variant: str, pn: str, batch: int, trials: int) -> dict:
  models.release()
  config, vae_config = _model_configs(variant, models.tiny)
  graphdef, params = nnx.split(random_module(lambda: Infinity(config, rngs=nnx.Rngs(0)), 0))
  vae_def, vae_state = nnx.split(
      random_module(lambda: InfinityVAE(vae_config, rngs=nnx.Rngs(1)), 1, jnp.bfloat16))
  loss_config = infinity_loss.InfinityLossConfig()
  tx = optax.chain(optax.clip_by_global_norm(5.0),
                   optax.adamw(6e-3 * batch / 256, b1=0.9, b2=0.97, weight_decay=0.005))
  opt_state = jax.jit(tx.init)(params)
  size = _schedule(pn, models.tiny).image_size[0]
  images = jnp.tanh(jax.random.normal(jax.random.key(2), (batch, size, size, 3))).astype(jnp.bfloat16)
  text, lengths = _text(config, batch, jax.random.key(3))

  def step(params, opt_state, vae_state, images, text, lengths, rng):
    def loss_fn(params):
      model = nnx.merge(graphdef, _cast(params, jnp.bfloat16))
      vae = nnx.merge(vae_def, vae_state)
      return infinity_loss.training_loss(model, vae, loss_config, images, rng, text=text,
                                         text_lengths=lengths)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  inputs = (vae_state, images, text, lengths)
  step = jax.jit(step, donate_argnums=(0, 1))
  _progress("compiling the training step")
  lowered = step.lower(params, opt_state, *inputs, jax.random.key(0))
  compiled = lowered.compile()
  _progress("compiled")
  # The lowered (pre-optimisation) module: the compiled GPU one hides its GEMMs and convolutions
  # in cuBLAS/cuDNN custom calls, which XLA's cost analysis does not count.
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0))
  state = [params, opt_state]

  def one(i):
    state[0], state[1], loss = compiled(state[0], state[1], *inputs, jax.random.key(i))
    return loss

  seconds, first = _median_time(one, trials)
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
  return {"step_s": seconds, "compile_s": first, "tflop_per_step": flops / 1e12,
          "mfu": flops / seconds / peak if peak and flops else None, "peak_gib": _peak_gib()}


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
  parser.add_argument("--trials", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="tiny model and VAE, 3 scales (CPU smoke)")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(f"# Infinity speed, random weights, bf16; device: {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}{' -- TINY smoke sizes, not the issue rows' if args.tiny else ''}")
  print("# official: PyTorch Infinity (SDPA, bf16) on an H100, quoted from the issue (not re-run)")
  print("| row | ours | official | speedup (target 2x) | transformer s / VAE decode s per batch | "
        "peak GiB | first call s (compile) | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  models = Models(args.tiny)
  for name in args.rows:
    variant, pn, batch, kind = ROWS[name]
    official, unit = OFFICIAL[name]
    try:
      if kind == "sample":
        r = bench_sampling(models, variant, pn, batch, args.trials)
        ours = r["s_per_image"] if unit == "s/image" else r["images_per_s"]
        speedup = official / ours if unit == "s/image" else ours / official
        split = f"{r['transformer_s']:.3f} / {r['decode_s']:.3f}"
        mfu = "-"
      else:
        r = bench_training(models, variant, pn, batch, args.trials)
        ours, speedup, split = r["step_s"], official / r["step_s"], "-"
        mfu = (f"{_fmt(r['mfu'], '.1%')} of {r['tflop_per_step']:.2f} TFLOP" if r["tflop_per_step"]
               else "n/a: this backend's cost analysis counts no flops (count them on CPU)")
      peak = _fmt(r["peak_gib"], ".1f")
      if name in TARGET_PEAK_GIB and r["peak_gib"] is not None:
        verdict = "under" if r["peak_gib"] < TARGET_PEAK_GIB[name] else "OVER"
        peak += f" ({verdict} {TARGET_PEAK_GIB[name]:.0f}; official {OFFICIAL_PEAK_GIB[name]})"
      met = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
      print(f"| {name} | {ours:.3f} {unit} | {official} {unit} | {speedup:.2f}x ({met}) | {split} | "
            f"{peak} | {r['compile_s']:.1f} | {mfu} |", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"| {name} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]} | {official} {unit} "
            "| | | | | |", flush=True)


if __name__ == "__main__":
  main()
