"""The tokenizer task (BSQ-ViT and other image tokenizers): reconstruction + quantizer loss.

Official objective (`transcoder/losses/vqperceptual.py` `VQLPIPSWithDiscriminator.forward`, generator
pass), with the yaml values `configs/tokenizer/imagenet_256x256_bsqvit_b18g2_stylegan_f8_fp16.yaml`:

  loss = mean(reconstruct_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec))
         + codebook_weight(step) * quant_loss
  codebook_weight(step) = codebook_weight * (r + codebook_rampup_multiplier * (1 - r)),
  r = min(step, codebook_rampup_steps) / codebook_rampup_steps          (r = 1 when steps = 0)

so the quantizer loss weight starts at 0.1 * 3.0 = 0.3 and ramps linearly down to 0.1 over the
first 2000 steps. `quant_loss` is the model's own quantizer loss (commitment + entropy terms,
`QuantizerOutput.loss`). The official perceptual weight is 0.1 with VGG-LPIPS, which needs
pretrained weights: here it is 0 unless `perceptual_weight > 0` and `lpips_weights` names a
user-supplied file (see `bitgen.train.lpips`). The StyleGAN discriminator term is not ported
(`gan_weight` must stay 0).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.train.task import scalar_metrics

LOSS_DEFAULTS = dict(
    reconstruct_weight=1.0, codebook_weight=0.1, codebook_rampup_multiplier=3.0,
    codebook_rampup_steps=2000, perceptual_weight=0.0, lpips_weights=None, gan_weight=0.0)


def codebook_weight(step, weight: float, multiplier: float, rampup_steps: int) -> jax.Array:
  """The official quantizer-loss weight at `step`: weight*multiplier at 0, weight from `rampup_steps`."""
  if rampup_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  rate = jnp.minimum(jnp.asarray(step, jnp.float32), rampup_steps) / rampup_steps
  return weight * (rate + multiplier * (1.0 - rate))


def loss_config(values: Mapping[str, Any] | None) -> dict[str, Any]:
  """LOSS_DEFAULTS updated by `values`, naming any unknown key."""
  values = dict(values or {})
  unknown = sorted(set(values) - set(LOSS_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown loss key(s) {unknown}; valid keys: {sorted(LOSS_DEFAULTS)}")
  config = {**LOSS_DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
  if config["gan_weight"]:
    raise NotImplementedError("the GAN term (gan_weight > 0) is not available in this trainer yet")
  if config["perceptual_weight"] and not config["lpips_weights"]:
    raise ValueError("perceptual_weight > 0 needs `lpips_weights`: the path of a user-supplied "
                     "LPIPS (VGG16) weight file (.npz, .safetensors or .pth); nothing is downloaded")
  return config


class TokenizerTask:
  """Trains an image tokenizer whose `__call__(images) -> (recon, QuantizerOutput)`.

  model_fn(rngs) builds the model (default: `bitgen.models.bsq_vit.BSQViT(model_config, rngs=rngs)`).
  """

  def __init__(self, model_config: Any = None, loss: Mapping[str, Any] | None = None,
               model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None):
    if model_fn is None and model_config is None:
      raise ValueError("TokenizerTask needs a model config or a model_fn")
    self.model_config = model_config
    self.model_fn = model_fn
    self.config = loss_config(loss)
    self.perceptual = None
    if self.config["perceptual_weight"]:
      from bitgen.train import lpips  # pylint: disable=g-import-not-at-top
      self.perceptual = lpips.LPIPS.from_file(self.config["lpips_weights"])

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    if self.model_fn is not None:
      return self.model_fn(rngs)
    from bitgen.models.bsq_vit import BSQViT  # pylint: disable=g-import-not-at-top
    return BSQViT(self.model_config, rngs=rngs)

  def loss(self, model, batch, *, step, rng):
    del rng  # the objective is deterministic
    c = self.config
    images = batch["image"]
    recon, quantizer_out = model(images)
    l1 = jnp.mean(jnp.abs(images - recon))
    nll = c["reconstruct_weight"] * l1
    metrics = {"l1": l1}
    if self.perceptual is not None:
      perceptual = jnp.mean(self.perceptual(images, recon))
      nll = nll + c["perceptual_weight"] * perceptual
      metrics["perceptual"] = perceptual
    weight = codebook_weight(step, c["codebook_weight"], c["codebook_rampup_multiplier"],
                             c["codebook_rampup_steps"])
    loss = nll + weight * quantizer_out.loss
    metrics |= {"nll": nll, "quant_loss": quantizer_out.loss, "codebook_weight": weight}
    metrics |= scalar_metrics("quantizer/", quantizer_out.metrics)
    return loss, metrics

  def visualize(self, model, batch):
    recon, _ = model(batch["image"])
    return {"inputs": batch["image"], "outputs": recon}
