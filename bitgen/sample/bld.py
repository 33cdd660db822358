"""Binary Latent Diffusion end to end: autoencoder + denoiser from a `configs/bld.py` config,
sampling bits with `bitgen.sample.binary_diffusion`, decoding them, writing PNG grids.

From official checkpoints: `sample_png(config, out_path, autoencoder_checkpoint=...,
denoiser_checkpoint=...)`; from a `bitgen train` workdir: `bitgen.train.bld.sample_grid`.
"""

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from bitgen import configlib
from bitgen.convert import bld as convert
from bitgen.models import bld_autoencoder as ae_lib
from bitgen.models import bld_denoiser as den_lib
from bitgen.sample import binary_diffusion as bd


def check_pairing(ae_config: ae_lib.Config, den_config: den_lib.Config) -> None:
  """The prior must model exactly the autoencoder's latent: same bits per position, same grid."""
  if ae_config.num_bits != den_config.num_bits:
    raise ValueError(
        f"bits mismatch: the autoencoder has num_bits={ae_config.num_bits} per position, the "
        f"denoiser (prior) num_bits={den_config.num_bits}")
  if ae_config.latent_size != den_config.latent_size:
    raise ValueError(
        f"latent grid mismatch: the autoencoder makes {ae_config.latent_size}x{ae_config.latent_size} "
        f"latents (image_size {ae_config.image_size}), the denoiser expects "
        f"{den_config.latent_size}x{den_config.latent_size}")


@dataclasses.dataclass
class Pipeline:
  autoencoder: ae_lib.BinaryAutoencoder
  denoiser: den_lib.Denoiser
  schedule: bd.NoiseSchedule
  p_flip: bool


def build(config: Mapping, *, autoencoder_checkpoint=None, denoiser_checkpoint=None,
          seed: int = 0) -> Pipeline:
  """Models from `config` (a `configs/bld.py` ConfigDict); official checkpoints load into them,
  otherwise parameters are freshly initialised from `seed`."""
  ae_config = configlib.from_dict(ae_lib.Config, dict(config["autoencoder"]), where="autoencoder config")
  den_config = configlib.from_dict(den_lib.Config, dict(config["denoiser"]), where="denoiser config")
  check_pairing(ae_config, den_config)
  diffusion = dict(config["diffusion"])
  schedule = bd.noise_schedule(diffusion["total_steps"], diffusion["beta_type"])

  def make(cls, cfg, checkpoint, load):
    if checkpoint is None:
      return nnx.jit(lambda: cls(cfg, rngs=nnx.Rngs(seed)))()
    return load(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))), checkpoint)

  if denoiser_checkpoint is not None:
    denoiser_checkpoint = convert.read_state_dict(denoiser_checkpoint)
    codebook = denoiser_checkpoint.get("embedding_weight")  # the AE codebook the prior trained on
    if codebook is not None and codebook.shape != (ae_config.num_bits, ae_config.emb_dim):
      raise ValueError(
          f"bits mismatch: the denoiser checkpoint was trained on an autoencoder with codebook "
          f"{codebook.shape} (num_bits, emb_dim), this autoencoder has "
          f"({ae_config.num_bits}, {ae_config.emb_dim})")
  autoencoder = make(ae_lib.BinaryAutoencoder, ae_config, autoencoder_checkpoint,
                     convert.load_autoencoder)
  denoiser = make(den_lib.Denoiser, den_config, denoiser_checkpoint,
                  lambda m, ckpt: convert.load_denoiser(m, ckpt, schedule=schedule))
  return Pipeline(autoencoder, denoiser, schedule, bool(diffusion["p_flip"]))


def decode(autoencoder: ae_lib.BinaryAutoencoder, bits: jax.Array) -> jax.Array:
  """(B, L, C) sampled bits -> (B, S, S, 3) float32 images clipped to [-1, 1] (traceable)."""
  size = autoencoder.config.latent_size
  grid = bits.reshape(bits.shape[0], size, size, bits.shape[-1])
  return jnp.clip(autoencoder.decode(grid), -1.0, 1.0).astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _compiled_sampler(den_graph: nnx.GraphDef, ae_graph: nnx.GraphDef, plan: bd.SamplingPlan):
  """The jit of `sampler`, one per (model structures, plan), so equal requests share a compile."""

  @jax.jit
  def images(den_state, ae_state, key, labels, temperature, guidance):
    bits = bd.sample_bits(nnx.merge(den_graph, den_state), plan, key, labels, temperature, guidance)
    return decode(nnx.merge(ae_graph, ae_state), bits)

  return images


def sampler(pipeline: Pipeline, *, batch: int, steps: int, spacing: bd.Spacing = "linspace",
            guided: bool = False) -> Callable[..., jax.Array]:
  """A compiled bits-to-images sampler for fixed settings: `fn(key, labels=None, temperature=1.0,
  guidance=0.0)` -> (batch, S, S, 3) images in [-1, 1].

  One jit holds the whole `lax.scan` over the steps and the autoencoder decode; the models are
  split once here (repeated calls pay no graph traversal or retrace), their parameters are
  arguments of the jit, not constants folded into it. `guided` compiles the [cond; uncond] pass.
  """
  plan = bd.sampling_plan(pipeline.denoiser.config, batch=batch, schedule=pipeline.schedule,
                          steps=steps, spacing=spacing, p_flip=pipeline.p_flip, guided=guided)
  den_graph, den_state = nnx.split(pipeline.denoiser)
  ae_graph, ae_state = nnx.split(pipeline.autoencoder)
  images = _compiled_sampler(den_graph, ae_graph, plan)

  def fn(key: jax.Array, labels=None, temperature: float = 1.0, guidance: float = 0.0) -> jax.Array:
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    return images(den_state, ae_state, key, bd.check_labels(plan, labels),
                  jnp.float32(temperature), jnp.float32(guidance))

  return fn


def generate(pipeline: Pipeline, key: jax.Array, *, batch: int, steps: int, temperature: float = 1.0,
             guidance: float | None = None, labels=None, spacing: bd.Spacing = "linspace") -> jax.Array:
  """(batch, S, S, 3) images in [-1, 1]. A class-conditional prior without labels gets
  labels 0, 1, 2, ... (mod num_classes)."""
  num_classes = pipeline.denoiser.config.num_classes
  if num_classes and labels is None:
    labels = jnp.arange(batch) % num_classes
  guided = guidance is not None and guidance != 0
  fn = sampler(pipeline, batch=batch, steps=steps, spacing=spacing, guided=guided)
  return fn(key, labels, temperature, guidance or 0.0)


def image_grid(images, *, columns: int = 8) -> np.ndarray:
  """(B, H, W, 3) images in [-1, 1] -> (rows*H, columns*W, 3) uint8, white where no image."""
  # Imported here: bitgen.train pulls in the data stack, which the GPU machine lacks.
  from bitgen.train.metrics import to_uint8  # pylint: disable=g-import-not-at-top
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"image_grid takes (B, H, W, C) images, got shape {images.shape}")
  b, h, w, c = images.shape
  columns = max(1, min(columns, b))
  rows = -(-b // columns)
  grid = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i in range(b):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
  return grid


def sample_options(defaults: Mapping, total_steps: int, *, steps: int | None = None,
                   temperature: float | None = None, guidance: float | None = None) -> dict:
  """The keyword arguments of `generate`: the given values over `defaults` (a config's `sample`
  block: steps, temperature, guidance, optional spacing), the step count checked against the
  `total_steps` the prior was trained with (so a bad request fails before any model loads)."""
  defaults = dict(defaults)
  options = dict(
      steps=defaults["steps"] if steps is None else steps,
      temperature=defaults["temperature"] if temperature is None else temperature,
      guidance=defaults["guidance"] if guidance is None else guidance,
      spacing=defaults.get("spacing", "linspace"))
  bd.sampling_steps(total_steps, options["steps"], options["spacing"])
  return options


def write_grid(pipeline: Pipeline, out_path, *, batch: int, seed: int, columns: int = 8,
               labels=None, **options) -> pathlib.Path:
  """Samples `batch` images (`options`: see `sample_options`) -> one PNG grid at `out_path`."""
  images = generate(pipeline, jax.random.key(seed), batch=batch, labels=labels, **options)
  path = pathlib.Path(out_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image_grid(images, columns=columns)).save(path)
  return path


def sample_png(config: Mapping, out_path, *, autoencoder_checkpoint=None, denoiser_checkpoint=None,
               batch: int = 16, steps: int | None = None, seed: int = 0,
               temperature: float | None = None, guidance: float | None = None, labels=None,
               columns: int = 8) -> pathlib.Path:
  """Samples `batch` images with `steps` denoiser steps (default: config.sample) -> one PNG grid."""
  options = sample_options(config["sample"], dict(config["diffusion"])["total_steps"], steps=steps,
                           temperature=temperature, guidance=guidance)
  pipeline = build(config, autoencoder_checkpoint=autoencoder_checkpoint,
                   denoiser_checkpoint=denoiser_checkpoint, seed=seed)
  return write_grid(pipeline, out_path, batch=batch, seed=seed, columns=columns, labels=labels,
                    **options)
