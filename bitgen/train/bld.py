"""Binary Latent Diffusion training: the Bernoulli autoencoder, then the prior on its frozen bits.

Two tasks for the generic trainer (`bitgen.train.trainer.run`), named by `config.task`:

- "bld_autoencoder" (`AutoencoderTask`): the tokenizer objective of `bitgen.train.tokenizer`
  (L1, optional LPIPS, the quantizer loss) on `bitgen.models.bld_autoencoder.BinaryAutoencoder`,
  with the training bits drawn ~ Bernoulli(p) from the step's key (the official
  `deterministic=False`); the quantizer loss weight is the model's `code_weight` (official: 0).
- "bld_prior" (`PriorTask`): the official diffusion loss (`binary_diffusion.training_loss`) of
  `bitgen.models.bld_denoiser.Denoiser` on batches {"bits": (B, L, C) uint8, "label": (B,)}, with
  each sample's class token dropped with probability `config.prior.label_dropout` (guidance).
  `EncodedBits` turns the image pipeline into those batches with the frozen autoencoder.

`train_bld(config_ae, config_prior, workdir)` runs both (in `<workdir>/ae` and `<workdir>/prior`,
resuming where they stopped) and evaluates them (`bitgen.eval.bld`); `sample_grid(...)` draws a
PNG grid from the trained checkpoints. The configs are `configs/bld.py:photos_ae|photos_prior`, or
both in `configs/bld.py:photos` (task "bld"), which `bitgen train` / `bitgen sample` take
(`sample_grid_from_config`).
"""

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from bitgen import configlib
from bitgen.models import bld_autoencoder as ae_lib
from bitgen.models import bld_denoiser as den_lib
from bitgen.sample import binary_diffusion as bd
from bitgen.sample import bld as bld_sample
from bitgen.train import config as config_lib
from bitgen.train.tokenizer import TokenizerTask

AE_BITS = ("sample", "threshold")
PRIOR_DEFAULTS = dict(label_dropout=0.1, ae_bits="sample")


def autoencoder_config(values: Mapping[str, Any]) -> ae_lib.Config:
  return configlib.from_dict(ae_lib.Config, dict(values), where="autoencoder config")


def denoiser_config(values: Mapping[str, Any]) -> den_lib.Config:
  return configlib.from_dict(den_lib.Config, dict(values), where="denoiser config")


def prior_options(config) -> dict[str, Any]:
  """`config.prior` over PRIOR_DEFAULTS, naming unknown keys and bad values."""
  given = dict(config.get("prior") or {})
  unknown = sorted(set(given) - set(PRIOR_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in config.prior; valid keys: {sorted(PRIOR_DEFAULTS)}")
  options = {**PRIOR_DEFAULTS, **given}
  if options["ae_bits"] not in AE_BITS:
    raise ValueError(f"config.prior.ae_bits must be one of {AE_BITS}, got {options['ae_bits']!r}")
  if not 0.0 <= options["label_dropout"] < 1.0:
    raise ValueError(f"config.prior.label_dropout must be in [0, 1), got {options['label_dropout']}")
  return options


class AutoencoderTask(TokenizerTask):
  """The tokenizer objective on the Bernoulli autoencoder, bits sampled with the step's key."""

  def __init__(self, model_config: Mapping[str, Any] | ae_lib.Config,
               loss: Mapping[str, Any] | None = None):
    if not isinstance(model_config, ae_lib.Config):
      model_config = autoencoder_config(model_config)
    # The official loss adds the quantizer loss at weight 1 (its size is the model's code_weight).
    loss = {"codebook_weight": 1.0, "codebook_rampup_steps": 0, **dict(loss or {})}
    super().__init__(model_config, loss=loss,
                     model_fn=lambda rngs: ae_lib.BinaryAutoencoder(model_config, rngs=rngs))

  def loss(self, model, batch, *, step, rng):
    return super().loss(functools.partial(model, key=rng), batch, step=step, rng=rng)


class PriorTask:
  """The official binary-diffusion loss on autoencoder bits, class-conditional with label dropout."""

  def __init__(self, model_config: Mapping[str, Any] | den_lib.Config,
               diffusion: Mapping[str, Any], *, label_dropout: float = 0.0):
    if not isinstance(model_config, den_lib.Config):
      model_config = denoiser_config(model_config)
    self.model_config = model_config
    diffusion = dict(diffusion)
    self.schedule = bd.noise_schedule(diffusion.pop("total_steps"), diffusion.pop("beta_type"))
    self.loss_options = diffusion  # p_flip, loss_type, focal_gamma, loss_final
    self.label_dropout = float(label_dropout)

  @property
  def conditional(self) -> bool:
    return self.model_config.num_classes > 0

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return den_lib.Denoiser(self.model_config, rngs=rngs)

  def _labels(self, batch):
    if not self.conditional:
      return None
    if "label" not in batch:
      raise ValueError("a class-conditional prior (num_classes > 0) needs batch['label']")
    return batch["label"].astype(jnp.int32)

  def loss(self, model, batch, *, step, rng):
    del step
    if "bits" not in batch:
      raise ValueError("the prior trains on autoencoder bits (batch['bits']), not on images: train "
                       "it with bitgen.train.bld.train_bld, or run(..., train_data=EncodedBits(...))")
    return bd.training_loss(model, batch["bits"], rng, schedule=self.schedule,
                            labels=self._labels(batch), label_drop_prob=self.label_dropout,
                            **self.loss_options)

  def visualize(self, model, batch):
    """The first 3 bits of each position as RGB: x_0 and the thresholded prediction from x_{T/2}."""
    x0 = batch["bits"]
    t = jnp.full((x0.shape[0],), max(1, self.schedule.total_steps // 2), jnp.int32)
    x_t = (jax.random.uniform(jax.random.key(0), x0.shape) < bd.q_probs(self.schedule, x0, t))
    logits = model(x_t.astype(jnp.uint8), t, self._labels(batch))
    if self.loss_options.get("p_flip", True):
      logits = bd.flip_to_x0_logits(logits, x_t)
    size = self.model_config.latent_size

    def as_image(bits):
      bits = bits.astype(jnp.float32).reshape(bits.shape[0], size, size, -1)[..., :3]
      return jnp.pad(bits, ((0, 0), (0, 0), (0, 0), (0, 3 - bits.shape[-1]))) * 2 - 1

    return {"inputs": as_image(x0), "outputs": as_image(logits > 0)}


def build_task(config):
  """The BLD task named by `config.task` ("bld_autoencoder" or "bld_prior")."""
  if config.task == "bld_autoencoder":
    return AutoencoderTask(config.model, loss=config.train.get("loss"))
  if config.task == "bld_prior":
    return PriorTask(config.model, config.diffusion,
                     label_dropout=prior_options(config)["label_dropout"])
  raise ValueError(f"unknown BLD task {config.task!r}; expected 'bld_autoencoder' or 'bld_prior'")


def on_one_device(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with every variable on this process's first device, unsharded (the trained
  models carry the training mesh's Explicit shardings, which single-device evaluation rejects)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(jax.device_get(state), jax.local_devices()[0]))


class EncodedBits:
  """Wraps an image-batch iterator: {"image", "label"} -> {"bits": (b, L, C) uint8, "label"}.

  The frozen autoencoder runs on this process's default device. ae_bits="sample" draws the bits
  with a key folded from `seed` and the batch count, which is checkpointed with the inner state.
  """

  def __init__(self, images, autoencoder: ae_lib.BinaryAutoencoder, *, ae_bits: str, seed: int):
    if ae_bits not in AE_BITS:
      raise ValueError(f"ae_bits must be one of {AE_BITS}, got {ae_bits!r}")
    self.images = images
    self.count = 0
    self.seed = seed
    graphdef, self.state = nnx.split(on_one_device(autoencoder))
    sampled = ae_bits == "sample"

    @jax.jit
    def encode(state, images, key):
      model = nnx.merge(graphdef, state)
      bits = model.encode(images, key=key if sampled else None)
      return bits.reshape(bits.shape[0], -1, bits.shape[-1])

    self.encode = encode

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.images)
    key = jax.random.fold_in(jax.random.key(self.seed), self.count)
    self.count += 1
    out = {"bits": np.asarray(self.encode(self.state, jnp.asarray(batch["image"]), key))}
    if "label" in batch:
      out["label"] = np.asarray(batch["label"], np.int32)
    return out

  # grain's checkpoint handler stores a non-grain iterator's state as bytes, then starts prefetch.
  def get_state(self) -> bytes:
    return json.dumps({"images": self.images.get_state(), "count": self.count}).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    self.images.set_state(state["images"])
    self.count = int(state["count"])

  def start_prefetch(self) -> None:
    if hasattr(self.images, "start_prefetch"):
      self.images.start_prefetch()


def encoded_bits(config, autoencoder: ae_lib.BinaryAutoencoder) -> EncodedBits:
  """This process's training batches of the prior config: its image pipeline, encoded."""
  from bitgen import data  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  images = iter(data.make_pipeline(config.data, split="train", batch_size=config.train.batch_size,
                                   seed=config.train.seed))
  return EncodedBits(images, autoencoder, ae_bits=prior_options(config)["ae_bits"],
                     seed=config.train.seed)


def restore_model(config, workdir: str | pathlib.Path, *, ema: bool = False) -> nnx.Module:
  """The model of a BLD training config from the latest checkpoint in `<workdir>/checkpoints`."""
  from bitgen.train.trainer import restore  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  return on_one_device(restore(config, workdir, task=build_task(config)).model(ema=ema))


def check_pair(config_ae, config_prior) -> ae_lib.Config:
  """The AE and prior configs are a pair: tasks, the prior's autoencoder, bits, latent grid.
  Returns the autoencoder's model config."""
  if config_ae.get("task") != "bld_autoencoder":
    raise ValueError(f"the autoencoder config must have task 'bld_autoencoder', got "
                     f"{config_ae.get('task')!r}")
  ae_config = autoencoder_config(config_ae.model)
  if config_prior.get("autoencoder") is not None:
    prior_ae = autoencoder_config(config_prior.autoencoder)
    differ = {f.name: (getattr(prior_ae, f.name), getattr(ae_config, f.name))
              for f in dataclasses.fields(ae_lib.Config)
              if getattr(prior_ae, f.name) != getattr(ae_config, f.name)}
    if differ:
      raise ValueError(
          "config_prior.autoencoder differs from config_ae.model (prior's vs autoencoder's: "
          + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items())
          + "): the prior must be trained on the bits of the autoencoder it is paired with")
  if config_prior.get("task") != "bld_prior":
    raise ValueError(f"the prior config must have task 'bld_prior', got {config_prior.get('task')!r}")
  bld_sample.check_pairing(ae_config, denoiser_config(config_prior.model))
  return ae_config


def check_configs(config_ae, config_prior) -> None:
  """`check_pair`, and the data agree: crop size, classes."""
  ae_config = check_pair(config_ae, config_prior)
  for config in (config_ae, config_prior):
    if dict(config.data)["image_size"] != ae_config.image_size:
      raise ValueError(f"data.image_size={dict(config.data)['image_size']} of the {config.task} "
                       f"config differs from the autoencoder's image_size={ae_config.image_size}")
  from bitgen import data  # pylint: disable=g-import-not-at-top
  labels_needed = data.num_classes(config_prior.data)
  num_classes = denoiser_config(config_prior.model).num_classes
  if num_classes and labels_needed > num_classes:
    raise ValueError(f"the prior has num_classes={num_classes} but its data has {labels_needed} "
                     "classes")


def train_bld(config_ae, config_prior, workdir: str | pathlib.Path, *,
              eval_batch_size: int = 64) -> dict[str, Any]:
  """Trains the autoencoder (`<workdir>/ae`), then the prior on its frozen bits
  (`<workdir>/prior`), evaluates both and writes `<workdir>/report.json`; returns the report.

  Report: the autoencoder's held-out PSNR/SSIM, and the prior's NLL bound in bits per bit against
  the bit-frequency baseline (`bitgen.eval.bld.evaluate_prior`), with steps and minutes.
  """
  from bitgen.train.trainer import run  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  check_configs(config_ae, config_prior)
  start = time.perf_counter()
  ae_result = run(config_ae, workdir / "ae", task=build_task(config_lib.with_defaults(config_ae)))
  ae_minutes = (time.perf_counter() - start) / 60
  autoencoder = on_one_device(ae_result.model(ema=True))

  start = time.perf_counter()
  prior_config = config_lib.with_defaults(config_prior)
  prior_result = run(config_prior, workdir / "prior", task=build_task(prior_config),
                     train_data=encoded_bits(config_prior, autoencoder))
  prior_minutes = (time.perf_counter() - start) / 60
  denoiser = on_one_device(prior_result.model(ema=True))

  start = time.perf_counter()
  report = evaluate_models(config_ae, config_prior, autoencoder, denoiser, batch_size=eval_batch_size)
  report["autoencoder"].update(steps=int(ae_result.state.step), train_minutes=ae_minutes)
  report["prior"].update(steps=int(prior_result.state.step), train_minutes=prior_minutes)
  report["eval_minutes"] = (time.perf_counter() - start) / 60
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  return report


def evaluate_models(config_ae, config_prior, autoencoder: nnx.Module, denoiser: nnx.Module, *,
                    batch_size: int = 64) -> dict[str, Any]:
  """The autoencoder's held-out PSNR/SSIM and the prior's NLL bound in bits per bit against the
  bit-frequency baseline (`bitgen.eval.bld`)."""
  from bitgen.eval import bld as bld_eval  # pylint: disable=g-import-not-at-top
  return {
      "autoencoder": bld_eval.evaluate_autoencoder(autoencoder, config_ae.data, batch_size=batch_size),
      "prior": bld_eval.evaluate_prior(denoiser, autoencoder, config_prior, batch_size=batch_size),
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }


def _stages(config, command: str):
  """(config.ae, config.prior) of a two-stage BLD config (`configs/bld.py:photos`), checked."""
  if config.get("task") != "bld" or "ae" not in config or "prior" not in config:
    raise ValueError(f"bitgen {command} needs a two-stage BLD config (task 'bld' with 'ae' and "
                     f"'prior' stages, e.g. bld:photos), got task {config.get('task')!r}")
  return config.ae, config.prior


def evaluate_from_config(config, workdir: str | pathlib.Path, *, ema: bool = False) -> dict[str, Any]:
  """`bitgen eval` for a two-stage BLD config: `evaluate_models` of the latest checkpoints of
  `<workdir>/ae` and `<workdir>/prior`."""
  config_ae, config_prior = _stages(config, "eval")
  check_pair(config_ae, config_prior)
  workdir = pathlib.Path(workdir)
  return evaluate_models(config_ae, config_prior, restore_model(config_ae, workdir / "ae", ema=ema),
                         restore_model(config_prior, workdir / "prior", ema=ema))


def sample_grid(config_ae, config_prior, workdir: str | pathlib.Path, out_path, *,
                batch: int = 16, steps: int | None = None, seed: int = 0,
                temperature: float | None = None, guidance: float | None = None, labels=None,
                columns: int = 8, ema: bool = True) -> pathlib.Path:
  """Samples `batch` images from the models `train_bld` trained in `workdir` -> one PNG grid.

  steps: any number of denoiser steps <= config_prior.diffusion.total_steps (default
  config_prior.sample.steps; spacing config_prior.sample.spacing); temperature / guidance default
  to config_prior.sample; labels (batch,) class ids, default 0, 1, 2, ... mod num_classes.
  The configs and the request are checked before the checkpoints load; a checkpoint written by
  another configuration is a `CheckpointError` naming the differing entries.
  """
  workdir = pathlib.Path(workdir)
  check_pair(config_ae, config_prior)
  diffusion = dict(config_prior.diffusion)
  schedule = bd.noise_schedule(diffusion["total_steps"], diffusion["beta_type"])
  options = bld_sample.sample_options(config_prior.sample, schedule.total_steps, steps=steps,
                                      temperature=temperature, guidance=guidance)
  pipeline = bld_sample.Pipeline(restore_model(config_ae, workdir / "ae", ema=ema),
                                 restore_model(config_prior, workdir / "prior", ema=ema),
                                 schedule, bool(diffusion["p_flip"]))
  return bld_sample.write_grid(pipeline, out_path, batch=batch, seed=seed, columns=columns,
                               labels=labels, **options)


def sample_grid_from_config(config, workdir: str | pathlib.Path, out_path, *,
                            num_images: int | None = None, steps: int | None = None,
                            seed: int | None = None, temperature: float | None = None,
                            guidance: float | None = None) -> pathlib.Path:
  """`bitgen sample` for a `configs/bld.py:photos`-style config (task "bld": `config.ae`,
  `config.prior`); None means the default (16 images, seed 0, config.prior.sample)."""
  config_ae, config_prior = _stages(config, "sample")
  return sample_grid(config_ae, config_prior, workdir, out_path,
                     batch=16 if num_images is None else num_images, steps=steps,
                     seed=0 if seed is None else seed, temperature=temperature, guidance=guidance)
