"""Binary Latent Diffusion end to end: autoencoder + denoiser from a `configs/bld.py` config,
sampling bits with `bitgen.sample.binary_diffusion`, decoding them, writing PNG grids.

CLI entry: `sample_png(config, out_path, autoencoder_checkpoint=..., denoiser_checkpoint=...)`.
"""

import dataclasses
import pathlib
from collections.abc import Mapping

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
from bitgen.train.metrics import to_uint8


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


@nnx.jit
def _decode(autoencoder: ae_lib.BinaryAutoencoder, bits: jax.Array) -> jax.Array:
  size = autoencoder.config.latent_size
  grid = bits.reshape(bits.shape[0], size, size, bits.shape[-1])
  return jnp.clip(autoencoder.decode(grid), -1.0, 1.0)


def generate(pipeline: Pipeline, key: jax.Array, *, batch: int, steps: int, temperature: float = 1.0,
             guidance: float | None = None, labels=None, spacing: bd.Spacing = "linspace") -> jax.Array:
  """(batch, S, S, 3) images in [-1, 1]. A class-conditional prior without labels gets
  labels 0, 1, 2, ... (mod num_classes)."""
  num_classes = pipeline.denoiser.config.num_classes
  if num_classes and labels is None:
    labels = jnp.arange(batch) % num_classes
  bits = bd.sample(pipeline.denoiser, key, batch=batch, schedule=pipeline.schedule, steps=steps,
                   spacing=spacing, temperature=temperature, guidance=guidance, labels=labels,
                   p_flip=pipeline.p_flip)
  return _decode(pipeline.autoencoder, bits)


def image_grid(images, *, columns: int = 8) -> np.ndarray:
  """(B, H, W, 3) images in [-1, 1] -> (rows*H, columns*W, 3) uint8, white where no image."""
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


def sample_png(config: Mapping, out_path, *, autoencoder_checkpoint=None, denoiser_checkpoint=None,
               batch: int = 16, steps: int | None = None, seed: int = 0,
               temperature: float | None = None, guidance: float | None = None, labels=None,
               columns: int = 8) -> pathlib.Path:
  """Samples `batch` images with `steps` denoiser steps (default: config.sample) -> one PNG grid."""
  pipeline = build(config, autoencoder_checkpoint=autoencoder_checkpoint,
                   denoiser_checkpoint=denoiser_checkpoint, seed=seed)
  defaults = dict(config["sample"])
  images = generate(
      pipeline, jax.random.key(seed), batch=batch, steps=steps or defaults["steps"],
      temperature=defaults["temperature"] if temperature is None else temperature,
      guidance=defaults["guidance"] if guidance is None else guidance, labels=labels)
  path = pathlib.Path(out_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image_grid(images, columns=columns)).save(path)
  return path
