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
user-supplied file (see `bitgen.train.lpips`).

The GAN term (official `disc_weight` 0.1, StyleGAN discriminator, non-saturating loss; on when
`gan_weight > 0`; keys in `bitgen.train.config.GAN_DEFAULTS`): the task then declares the
discriminator as its auxiliary module (`bitgen.train.task.AuxiliaryTask`), adds
`gan_weight * disc_factor(step) * g_loss(D(x_rec))` to the loss above, and trains D on
(x, stop_gradient(x_rec)) in the same step (`bitgen.train.gan`). The discriminator starts from random
weights; nothing is downloaded.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.train import gan
from bitgen.train.config import GAN_DEFAULTS
from bitgen.train.task import scalar_metrics

LOSS_DEFAULTS = dict(
    reconstruct_weight=1.0, codebook_weight=0.1, codebook_rampup_multiplier=3.0,
    codebook_rampup_steps=2000, perceptual_weight=0.0, lpips_weights=None, **GAN_DEFAULTS)


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
  if config["gan_loss"] not in gan.GAN_LOSSES:
    raise ValueError(f"loss key gan_loss={config['gan_loss']!r}; expected one of {gan.GAN_LOSSES}")
  if config["gan_weight"] < 0 or config["gan_start"] < 0 or config["gan_r1_gamma"] < 0:
    raise ValueError("loss keys gan_weight, gan_start and gan_r1_gamma must be >= 0, got "
                     f"{config['gan_weight']}, {config['gan_start']}, {config['gan_r1_gamma']}")
  if config["gan_r1_every"] <= 0:
    raise ValueError(f"loss key gan_r1_every={config['gan_r1_every']} must be a positive step count")
  if config["perceptual_weight"] and not config["lpips_weights"]:
    raise ValueError("perceptual_weight > 0 needs `lpips_weights`: the path of a user-supplied "
                     "LPIPS (VGG16) weight file (.npz, .safetensors or .pth); nothing is downloaded")
  return config


class TokenizerTask:
  """Trains an image tokenizer whose `__call__(images) -> (recon, QuantizerOutput)`.

  model_fn(rngs) builds the model (default: `bitgen.models.bsq_vit.BSQViT(model_config, rngs=rngs)`).
  image_size: the discriminator's input size when the GAN is on (default: `model_config.image_size`).
  """

  def __init__(self, model_config: Any = None, loss: Mapping[str, Any] | None = None,
               model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None,
               image_size: int | None = None):
    if model_fn is None and model_config is None:
      raise ValueError("TokenizerTask needs a model config or a model_fn")
    self.model_config = model_config
    self.model_fn = model_fn
    self.config = loss_config(loss)
    self.perceptual = None
    if self.config["perceptual_weight"]:
      from bitgen.train import lpips  # pylint: disable=g-import-not-at-top
      self.perceptual = lpips.LPIPS.from_file(self.config["lpips_weights"])
    self.discriminator_config = None
    if self.config["gan_weight"]:
      self.discriminator_config = self._discriminator_config(image_size)

  def _discriminator_config(self, image_size: int | None):
    from bitgen.models import stylegan_discriminator as sd  # pylint: disable=g-import-not-at-top
    if image_size is None:
      model = self.model_config
      image_size = model.get("image_size") if isinstance(model, Mapping) else getattr(
          model, "image_size", None)
    if image_size is None:
      raise ValueError("gan_weight > 0 needs the discriminator's image size: pass "
                       "TokenizerTask(image_size=...) or a model config with `image_size`")
    c = self.config
    return sd.Config(image_size=int(image_size), channel_base=c["gan_channel_base"],
                     channel_max=c["gan_channel_max"], mbstd_group_size=c["gan_mbstd_group_size"])

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    if self.model_fn is not None:
      return self.model_fn(rngs)
    from bitgen.models.bsq_vit import BSQViT  # pylint: disable=g-import-not-at-top
    return BSQViT(self.model_config, rngs=rngs)

  def reconstruct(self, model, images, rng):
    """(reconstructions, QuantizerOutput) of `model` on `images`."""
    del rng  # the tokenizers here are deterministic
    return model(images)

  def loss(self, model, batch, *, step, rng):
    loss, metrics, _ = self._objective(model, None, batch, step, rng)
    return loss, metrics

  # The GAN term: the discriminator is this task's auxiliary module (bitgen.train.task).

  def build_auxiliary(self, rngs: nnx.Rngs) -> nnx.Module | None:
    if self.discriminator_config is None:
      return None
    from bitgen.models.stylegan_discriminator import StyleGANDiscriminator  # pylint: disable=g-import-not-at-top
    return StyleGANDiscriminator(self.discriminator_config, rngs=rngs)

  def loss_with_auxiliary(self, model, auxiliary, batch, *, step, rng):
    return self._objective(model, auxiliary, batch, step, rng)

  def auxiliary_loss(self, auxiliary, outputs, batch, *, step, rng):
    """The discriminator's loss on real images and this step's reconstructions (`outputs`)."""
    del rng
    c = self.config
    images = batch["image"]
    logits_real, logits_fake = auxiliary(images), auxiliary(outputs)
    factor = gan.disc_factor(step, c["gan_start"])
    d_loss = gan.discriminator_loss(logits_real, logits_fake, c["gan_loss"])
    loss = factor * d_loss
    metrics = {"gan/d_loss": d_loss, "gan/logits_real": jnp.mean(logits_real),
               "gan/logits_fake": jnp.mean(logits_fake)}
    if c["gan_r1_gamma"]:
      every = c["gan_r1_every"]
      graphdef, state = nnx.split(auxiliary)
      r1 = jax.lax.cond(
          (step + 1) % every == 0,
          lambda s: gan.r1_penalty(nnx.merge(graphdef, s), images), lambda s: jnp.zeros(()), state)
      loss = loss + factor * (c["gan_r1_gamma"] / 2 * every) * r1
      metrics["gan/r1"] = r1
    return loss, metrics

  def auxiliary_active(self, step):
    return step >= self.config["gan_start"]

  def _nll(self, images, recon):
    """The reconstruction loss: weighted L1 (+ weighted LPIPS), and its metrics."""
    c = self.config
    l1 = jnp.mean(jnp.abs(images - recon))
    nll = c["reconstruct_weight"] * l1
    metrics = {"l1": l1}
    if self.perceptual is not None:
      perceptual = jnp.mean(self.perceptual(images, recon))
      nll = nll + c["perceptual_weight"] * perceptual
      metrics["perceptual"] = perceptual
    return nll, metrics

  def _objective(self, model, discriminator, batch, step, rng):
    """(loss, metrics, reconstructions); the GAN term when `discriminator` is given."""
    c = self.config
    images = batch["image"]
    if discriminator is not None and c["gan_adaptive_layer"]:
      recon, quantizer_out, nll, metrics, g_loss, d_weight = self._adaptive_forward(
          model, discriminator, images, rng)
    else:
      recon, quantizer_out = self.reconstruct(model, images, rng)
      nll, metrics = self._nll(images, recon)
      if discriminator is not None:
        g_loss = gan.generator_loss(discriminator(recon), c["gan_loss"])
        d_weight = jnp.asarray(c["gan_weight"], jnp.float32)
    weight = codebook_weight(step, c["codebook_weight"], c["codebook_rampup_multiplier"],
                             c["codebook_rampup_steps"])
    loss = nll + weight * quantizer_out.loss
    if discriminator is not None:
      factor = gan.disc_factor(step, c["gan_start"])
      loss = loss + d_weight * factor * g_loss
      metrics |= {"gan/g_loss": g_loss, "gan/d_weight": d_weight, "gan/disc_factor": factor}
    metrics |= {"nll": nll, "quant_loss": quantizer_out.loss, "codebook_weight": weight}
    metrics |= scalar_metrics("quantizer/", quantizer_out.metrics)
    return loss, metrics, recon

  def _adaptive_forward(self, model, discriminator, images, rng):
    """The forward pass with VQGAN's adaptive GAN weight: the gradient norms of the nll and of the
    generator loss at the parameter `gan_adaptive_layer` (official: the decoder's last layer)."""
    c = self.config
    target = tuple(c["gan_adaptive_layer"].split("/"))
    graphdef, layer, rest = nnx.split(
        model, lambda path, _: tuple(str(p) for p in path) == target, ...)
    if not jax.tree.leaves(layer):
      raise ValueError(f"loss key gan_adaptive_layer={c['gan_adaptive_layer']!r} names no parameter "
                       f"of {type(model).__name__} (a '/'-joined path like 'decoder/to_pixels/kernel')")

    def forward(layer):
      recon, quantizer_out = self.reconstruct(nnx.merge(graphdef, layer, rest), images, rng)
      nll, metrics = self._nll(images, recon)
      g_loss = gan.generator_loss(discriminator(recon), c["gan_loss"])
      return (nll, g_loss), (recon, quantizer_out, metrics)

    (nll, g_loss), vjp, (recon, quantizer_out, metrics) = jax.vjp(forward, layer, has_aux=True)
    one, zero = jnp.ones_like(nll), jnp.zeros_like(nll)
    nll_grad, = jax.tree.leaves(vjp((one, zero)))
    g_grad, = jax.tree.leaves(vjp((zero, one)))
    d_weight = gan.adaptive_weight(nll_grad, g_grad, c["gan_weight"])
    return recon, quantizer_out, nll, metrics, g_loss, d_weight

  def visualize(self, model, batch):
    recon, _ = model(batch["image"])
    return {"inputs": batch["image"], "outputs": recon}
