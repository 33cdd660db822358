"""Benchmark: Binary Latent Diffusion sampling throughput, prior + autoencoder decode, vs the official.

    python -m bitgen.bench.bld [--steps 16 64] [--batch 16] [--trials 5] [--precisions float32 bfloat16]
    python -m bitgen.bench.bld --config tiny --batch 2 --steps 4    # a seconds-long CPU smoke run

Times `bitgen.sample.bld.sampler`: one jit holding the `lax.scan` over the steps and the decode of
the sampled bits to 256^2 images, end to end per batch (key -> images on the device,
`block_until_ready`), temperature 0.9, no guidance (the C64 prior is unconditional), with random
weights of the C64 models (`configs/bld.py:c64`, built here
so that this module needs only jax/flax: no tfds/grain/ml_collections/dm-pix). Images/s = batch /
the median time of `trials` batches after one warm-up (compile) batch.

Precision "bfloat16" is autocast-style: every Linear/Conv/Norm/Embed computes in bfloat16 (its
`dtype`), with the Linear/Conv weights cast to bfloat16 once (PyTorch autocast's cast cache), norm
parameters and the residual stream float32: elementwise ops promote as they meet float32 values.

The official numbers (PyTorch, ZeWang95/BinaryLatentDiffusion, C64 at 256^2, batch 16, on the same
H100 kind, including the decode) are quoted from the project issue: they cannot be re-run here, as
there is no PyTorch BLD on the device machine.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.models import bld_autoencoder as ae_lib
from bitgen.models import bld_denoiser as den_lib
from bitgen.sample import binary_diffusion as bd
from bitgen.sample import bld as bld_sample

# (precision, steps) -> images/s of the official PyTorch sampler + decode (quoted, not re-run).
OFFICIAL = {("bfloat16", 16): 53.2, ("bfloat16", 64): 19.9,
            ("float32", 16): 22.5, ("float32", 64): 5.8}
TARGET_SPEEDUP = 2.0
TEMPERATURE = 0.9  # configs/bld.py sample.temperature

# The values of configs/bld.py (c64 and tiny); tests/bench check that they agree.
CONFIGS = {
    "c64": dict(
        autoencoder=dict(
            image_size=256, in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2, attn_resolutions=(16,), emb_dim=256, num_bits=64,
            decoder_res_mult=1.0, norm_first=True, code_weight=0.0),
        denoiser=dict(num_bits=64, latent_size=16, width=768, heads=12, depth=24, num_classes=0,
                      time_scale_steps=64),
        total_steps=64, beta_type="linear"),
    "tiny": dict(
        autoencoder=dict(
            image_size=32, in_channels=3, base_channels=32, channel_mult=(1, 1, 2),
            num_res_blocks=2, attn_resolutions=(8,), emb_dim=64, num_bits=32,
            decoder_res_mult=1.0, norm_first=True, code_weight=0.0),
        denoiser=dict(num_bits=32, latent_size=8, width=64, heads=2, depth=2, num_classes=10,
                      time_scale_steps=16),
        total_steps=16, beta_type="linear"),
}
_COMPUTE_MODULES = (nnx.Linear, nnx.Conv, nnx.LayerNorm, nnx.GroupNorm, nnx.Embed)


def autocast(model: nnx.Module, dtype, *, cast_weights: bool = True) -> nnx.Module:
  """Every Linear/Conv/Norm/Embed of `model` computes in `dtype` (its `dtype` attribute).

  cast_weights: also store the Linear/Conv kernels and biases in `dtype` once, as PyTorch
  autocast's weight-cast cache does; those layers cast them to `dtype` before every use anyway, so
  the results are the same, minus a float32 -> `dtype` conversion of every weight per denoiser
  step. Norm and Embed parameters stay float32.
  """
  for _, module in nnx.iter_graph(model):
    if isinstance(module, _COMPUTE_MODULES):
      module.dtype = dtype
    if cast_weights and isinstance(module, (nnx.Linear, nnx.Conv)):
      for param in (module.kernel, module.bias):
        if param is not None:
          param.set_value(param[...].astype(dtype))
  return model


def build_pipeline(name: str, precision: str, seed: int = 0) -> bld_sample.Pipeline:
  spec = CONFIGS[name]
  ae_config = ae_lib.Config(**spec["autoencoder"])
  den_config = den_lib.Config(**spec["denoiser"])
  autoencoder = nnx.jit(lambda: ae_lib.BinaryAutoencoder(ae_config, rngs=nnx.Rngs(seed)))()
  denoiser = nnx.jit(lambda: den_lib.Denoiser(den_config, rngs=nnx.Rngs(seed + 1)))()
  if precision == "bfloat16":
    autocast(autoencoder, jnp.bfloat16)
    autocast(denoiser, jnp.bfloat16)
  return bld_sample.Pipeline(autoencoder, denoiser,
                             bd.noise_schedule(spec["total_steps"], spec["beta_type"]), p_flip=True)


def images_per_second(pipeline: bld_sample.Pipeline, *, batch: int, steps: int,
                      trials: int) -> tuple[float, float]:
  """(images/s from the median batch time, first-call seconds incl. compile)."""
  generate = bld_sample.sampler(pipeline, batch=batch, steps=steps)
  num_classes = pipeline.denoiser.config.num_classes
  labels = jnp.arange(batch) % num_classes if num_classes else None
  key = jax.random.key(0)
  start = time.perf_counter()
  jax.block_until_ready(generate(key, labels, TEMPERATURE))
  first = time.perf_counter() - start
  times = []
  for i in range(trials):
    start = time.perf_counter()
    jax.block_until_ready(generate(jax.random.fold_in(key, i + 1), labels, TEMPERATURE))
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times), first


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="c64", choices=sorted(CONFIGS))
  parser.add_argument("--steps", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--trials", type=int, default=5)
  parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(f"# BLD sampling + AE decode, config {args.config}, batch {args.batch}, "
        f"{CONFIGS[args.config]['autoencoder']['image_size']}^2, random weights")
  print(f"# device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  print("# official: PyTorch BLD on the same H100 kind, quoted from the issue (not re-run: no "
        "PyTorch BLD on this machine); bf16 = autocast, fp32 = its default precision")
  ours: dict[tuple[str, int], float] = {}
  print("| precision | steps | ours img/s | first call s | official img/s (same precision) | "
        "speedup | vs official bf16 |")
  print("|---|---|---|---|---|---|---|")
  for precision in args.precisions:
    pipeline = build_pipeline(args.config, precision)
    for steps in args.steps:
      rate, first = images_per_second(pipeline, batch=args.batch, steps=steps, trials=args.trials)
      ours[(precision, steps)] = rate
      official = OFFICIAL.get((precision, steps)) if args.config == "c64" and args.batch == 16 else None
      best_official = (OFFICIAL.get(("bfloat16", steps))
                       if args.config == "c64" and args.batch == 16 else None)
      cell = lambda v, fmt: fmt.format(v) if v else "n/a"
      print(f"| {precision} | {steps} | {rate:.1f} | {first:.1f} | {cell(official, '{:.1f}')} | "
            f"{cell(official and rate / official, '{:.2f}x')} | "
            f"{cell(best_official and rate / best_official, '{:.2f}x')} |", flush=True)
  if args.config == "c64" and args.batch == 16:
    for steps in args.steps:
      if ("bfloat16", steps) in OFFICIAL:
        best = max(rate for (p, s), rate in ours.items() if s == steps)
        verdict = "meets" if best >= TARGET_SPEEDUP * OFFICIAL[("bfloat16", steps)] else "misses"
        print(f"# {steps} steps: best ours {best:.1f} img/s = {best / OFFICIAL[('bfloat16', steps)]:.2f}x "
              f"the official bf16 {OFFICIAL[('bfloat16', steps)]} img/s: {verdict} the "
              f"{TARGET_SPEEDUP:.0f}x target")


if __name__ == "__main__":
  main()
