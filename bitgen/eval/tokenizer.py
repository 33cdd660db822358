"""Evaluates a tokenizer on the held-out split: PSNR/SSIM, code statistics, same-bit baseline.

Runs on any mesh and any number of processes: each process feeds its share of the evaluation
batches, the forward pass runs sharded, and per-example results are gathered on every process.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bitgen import data, parallel
from bitgen.eval import metrics
from bitgen.eval.baseline import area_downsample_baseline


def evaluate_tokenizer(model: nnx.Module, data_config: Any, *, mesh: jax.sharding.Mesh,
                       rules: dict, batch_size: int) -> dict[str, Any]:
  """Metrics of `model` (`model(images) -> (recon, QuantizerOutput)`) over the eval split.

  The baseline stores each `patch x patch` block's mean colour in the same number of bits as one
  token (see `bitgen.eval.baseline`).
  """
  model_config = model.config
  num_bits = model.quantizer.num_bits
  patch = model_config.patch_size
  baseline_bits = 3 * math.floor(num_bits / 3)
  graphdef, state = nnx.split(model)

  def forward(state, images):
    recon, quantized = nnx.merge(graphdef, state)(images)
    psnr, ssim = metrics.psnr_ssim(images, recon)
    base_psnr, base_ssim = metrics.psnr_ssim(
        images, area_downsample_baseline(images, patch=patch, bits_per_token=baseline_bits))
    return dict(psnr=psnr, ssim=ssim, baseline_psnr=base_psnr, baseline_ssim=base_ssim,
                codes=quantized.codes)

  mesh = parallel.with_auto_axes(mesh)  # the model's arrays live there (TrainResult.model)
  sharding = parallel.batch_sharding(mesh, rules)
  forward = jax.jit(forward)
  pipeline = data.make_pipeline(data_config, split="eval", batch_size=batch_size, seed=0)
  results: dict[str, list[np.ndarray]] = {}
  with jax.set_mesh(mesh):
    for local in pipeline:
      batch = parallel.global_batch(local, sharding)
      outputs = forward(state, batch["image"])
      outputs["mask"] = batch["mask"]
      for name, value in multihost_utils.process_allgather(outputs, tiled=True).items():
        results.setdefault(name, []).append(np.asarray(value))
  if not results:
    raise ValueError(f"the eval split of {data_config} produced no batches of {batch_size}")
  merged = {name: np.concatenate(values) for name, values in results.items()}
  keep = merged.pop("mask").astype(bool)
  merged = {name: value[keep] for name, value in merged.items()}
  codes = merged.pop("codes")
  stats = metrics.code_statistics(codes, codebook_size=2.0**num_bits)
  report = {name: float(np.mean(value)) for name, value in merged.items()}
  report.update(
      num_images=int(keep.sum()),
      bits_per_token=float(num_bits),
      tokens_per_image=int(np.prod(codes.shape[1:-1])),
      baseline=f"{patch}x{patch} area mean, {baseline_bits // 3} bits per channel, bilinear upsampling",
      per_bit_entropy=stats["per_dim_entropy"],
      mean_bit_entropy=stats["mean_dim_entropy"],
      unique_codes=stats["unique_codes"],
      code_usage=stats["code_usage"],
  )
  return report


def evaluate_result(config, result, *, ema: bool = False) -> dict[str, Any]:
  """`evaluate_tokenizer` for a `bitgen.train.TrainResult` of `config`, on the config's mesh."""
  from bitgen.train import config as train_config  # pylint: disable=g-import-not-at-top
  config = train_config.with_defaults(config)
  return evaluate_tokenizer(
      result.model(ema=ema), config.data, mesh=parallel.make_mesh(config.mesh),
      rules=parallel.rules_from_config(config.mesh.rules), batch_size=config.train.batch_size)
