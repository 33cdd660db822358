"""The adversarial terms of the official BSQ-ViT objective, as pure functions of logits and gradients.

Official `transcoder/losses/vqperceptual.py` (`VQLPIPSWithDiscriminator`), with the yaml values of
`configs/tokenizer/imagenet_256x256_bsqvit_b18g2_stylegan_f8_fp16.yaml` (`disc_loss: vanilla`,
`disc_weight: 0.1`, `disc_start: 0`, `use_adaptive_disc_weight: False`):

  generator:      loss += d_weight * disc_factor * g_loss(D(x_rec))
  discriminator:  d_loss = disc_factor * d_loss(D(x), D(stop_gradient(x_rec)))
  disc_factor = 1 from `disc_start` on, else 0
  d_weight = disc_weight, or (adaptive) disc_weight * clip(|grad nll| / (|grad g_loss| + 1e-4), 0, 1e4)
             with both gradients at the generator's last layer, not differentiated

The official loop (`scripts/main_image_tokenizer.py`) computes x_rec once, steps the generator
(AdamW), then the discriminator (a second AdamW of the same settings, stepped at the same lr) on the
detached x_rec. Before `disc_start` its loss is 0, so the official AdamW only applies weight decay
and counts the step; here the weights are held (`auxiliary_active`) while the count still advances.

"vanilla" is the non-saturating loss: g = mean(softplus(-fake)),
d = (mean(softplus(-real)) + mean(softplus(fake))) / 2; "hinge": g = -mean(fake),
d = (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2.

R1 penalty (`d_r1_loss`, every `disc_reg_freq`=16 steps, weight `disc_reg_r1`/2 * freq = 10/2 * 16):
the official code takes the input gradient without `create_graph=True`, so the penalty is a constant
that changes no gradient (it is only logged). `r1_penalty` here is the differentiable StyleGAN2 R1;
it is off unless a config asks for it (`gan_r1_gamma` > 0).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

GAN_LOSSES = ("vanilla", "hinge")


def _check(kind: str) -> None:
  if kind not in GAN_LOSSES:
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


def generator_loss(logits_fake: jax.Array, kind: str = "vanilla") -> jax.Array:
  """The generator's adversarial loss on the discriminator's logits of reconstructions."""
  _check(kind)
  if kind == "hinge":
    return -jnp.mean(logits_fake)
  return jnp.mean(jax.nn.softplus(-logits_fake))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array,
                       kind: str = "vanilla") -> jax.Array:
  """The discriminator's loss: real images should score high, reconstructions low."""
  _check(kind)
  if kind == "hinge":
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                  + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def disc_factor(step, start: int) -> jax.Array:
  """1.0 from step `start` on, else 0.0 (the official `disc_factor`)."""
  return (jnp.asarray(step) >= start).astype(jnp.float32)


def adaptive_weight(nll_grad: jax.Array, gan_grad: jax.Array, weight: float) -> jax.Array:
  """weight * clip(|nll_grad| / (|gan_grad| + 1e-4), 0, 1e4), not differentiated."""
  ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * weight)


def r1_penalty(discriminator: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
  """mean over images of |d sum(D(images)) / d image|^2 (StyleGAN2's R1), differentiable in D."""
  grads = jax.grad(lambda x: jnp.sum(discriminator(x)))(images)
  return jnp.mean(jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1))
