"""Infinity's training loss (official `trainer.py::train_step`, `use_bit_label=1`, `bitloss_type='mean'`).

Per bit, a 2-way cross-entropy between logits (B, L, 2d) viewed as (B, L, d, 2) and the bit labels
(B, L, d); averaged over the d bits of a token, then a weighted sum over tokens (weights sum to 1)
and a mean over the batch. With `reweight_loss_by_scale`, token weights of scale k are
proportional to sqrt(h_K w_K) / sqrt(h_k w_k) (K = last scale of the full schedule), so each scale
counts about as much as its side length; otherwise 1 / L.

`training_loss` is the whole forward of the official train step (self-correction targets from the
frozen VAE, condition dropout, the loss); `bitgen.train.infinity.InfinityTask` wraps it for the
trainer, and `bitgen.bench.infinity` times it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.models import infinity_schedules
from bitgen.models.infinity_schedules import Schedule
from bitgen.quantizers import bitwise_self_correction as bsc
from bitgen.quantizers import multiscale


def scale_loss_weights(schedule: Schedule, *, num_train_scales: int | None = None,
                       reweight_by_scale: bool = True) -> np.ndarray:
  """(L,) float32 token weights of the first `num_train_scales` scales (default: all), summing to 1."""
  grids = schedule.grids[:num_train_scales]
  if reweight_by_scale:
    last = np.sqrt(np.prod(schedule.grids[-1]))
    weights = np.concatenate([np.full(h * w, last / np.sqrt(h * w)) for h, w in grids])
  else:
    weights = np.ones(sum(h * w for h, w in grids))
  return (weights / weights.sum()).astype(np.float32)


def bitwise_cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """logits (B, L, 2d), labels (B, L, d) in {0, 1} -> (B, L, d) per-bit cross-entropy (nats)."""
  batch, length, num_bits = labels.shape
  if logits.shape != (batch, length, 2 * num_bits):
    raise ValueError(f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)} "
                     f"(expected (B, L, 2 * {num_bits}))")
  log_probs = jax.nn.log_softmax(logits.reshape(batch, length, num_bits, 2).astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
  return nll


def bitwise_loss(logits: jax.Array, labels: jax.Array, token_weights: jax.Array, *,
                 label_smoothing: float = 0.0) -> jax.Array:
  """() scalar: sum_l w_l * mean_c CE(b, l, c), averaged over the batch."""
  per_token = jnp.mean(bitwise_cross_entropy(logits, labels, label_smoothing=label_smoothing), axis=-1)
  return jnp.mean(jnp.sum(per_token * token_weights, axis=-1))


def bits_per_bit(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """() mean negative log-likelihood of every bit, in bits (unweighted over tokens)."""
  return jnp.mean(bitwise_cross_entropy(logits, labels)) / jnp.log(2.0)


def bit_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """(B, L) fraction of a token's bits whose argmax prediction is right."""
  batch, length, num_bits = labels.shape
  predicted = jnp.argmax(logits.reshape(batch, length, num_bits, 2), axis=-1)
  return jnp.mean((predicted == labels).astype(jnp.float32), axis=-1)


def fit_bit_frequencies(labels: np.ndarray, schedule: Schedule) -> np.ndarray:
  """(K, d) frequency of ones per scale and bit channel over training labels (N, L, d), smoothed
  by add-one (Laplace): the unconditional baseline a conditional model has to beat."""
  labels = np.asarray(labels)
  probs = []
  for start, count in zip(schedule.offsets, schedule.tokens_per_scale):
    ones = labels[:, start:start + count].reshape(-1, labels.shape[-1]).sum(0)
    probs.append((ones + 1.0) / (labels.shape[0] * count + 2.0))
  return np.stack(probs)


def baseline_bits_per_bit(frequencies: np.ndarray, labels: np.ndarray, schedule: Schedule) -> float:
  """Mean NLL in bits of held-out labels (N, L, d) under independent per-(scale, channel) bits."""
  labels = np.asarray(labels, np.float64)
  per_token = np.concatenate([np.repeat(frequencies[k][None], n, 0)
                              for k, n in enumerate(schedule.tokens_per_scale)])  # (L, d)
  nll = -(labels * np.log2(per_token) + (1 - labels) * np.log2(1 - per_token))
  return float(nll.mean())


@dataclasses.dataclass(frozen=True)
class InfinityLossConfig:
  """Official defaults of train.sh / arg_util.py."""

  cond_drop_rate: float = 0.1
  noise_strength: float = 0.3  # --noise_apply_strength: flip probability drawn from [0, 0.3]
  noise_layers: int = 13  # --noise_apply_layers: the first 13 scales are corrupted
  requantize: bool = True  # --noise_apply_requant
  num_train_scales: int = 100  # --always_training_scales
  reweight_by_scale: bool = True  # --reweight_loss_by_scale
  label_smoothing: float = 0.0  # --ls


def training_schedules(vae, model_config, image_shape: tuple[int, ...]
                       ) -> tuple[Schedule, tuple[tuple[int, int], ...]]:
  """(transformer schedule, VAE grids) for images of this shape (the official prefix reaching the
  latent grid; VAE grids are 2x the token grids with spatial patchify)."""
  factor = 2 if model_config.spatial_patchify else 1
  stride = vae.config.patch_size * factor
  schedule = infinity_schedules.schedule_for_latent(image_shape[1] // stride, image_shape[2] // stride)
  return schedule, tuple((h * factor, w * factor) for h, w in schedule.grids)


def training_targets(vae, model_config, loss_config: InfinityLossConfig, images: jax.Array,
                     rng: jax.Array) -> tuple[Schedule, jax.Array, jax.Array]:
  """(training schedule, inputs (B, L - 1, d), labels (B, L, d)) with bitwise self-correction:
  frozen VAE features -> `flip_requant` with flip strengths drawn per scale."""
  c = loss_config
  schedule, vae_grids = training_schedules(vae, model_config, images.shape)
  features = jax.lax.stop_gradient(vae.encode_features(images))
  noise = None
  if c.noise_strength > 0 and c.noise_layers > 0:
    noise = bsc.draw_flip_noise(rng, vae_grids, images.shape[0], vae.num_bits,
                                max_strength=c.noise_strength, num_noisy_scales=c.noise_layers)
  inputs, labels = bsc.flip_requant(features, vae_grids, noise, requantize=c.requantize)
  if model_config.spatial_patchify:
    inputs = multiscale.concat_scales(
        [multiscale.patchify(x) for x in multiscale.split_scales(inputs, vae_grids[1:])])
    labels = multiscale.concat_scales(
        [multiscale.patchify(x) for x in multiscale.split_scales(labels, vae_grids)])
  num_scales = min(c.num_train_scales, schedule.num_scales)
  train_schedule = schedule.prefix(num_scales)
  return train_schedule, inputs[:, :train_schedule.num_tokens - 1], labels[:, :train_schedule.num_tokens]


def training_loss(model, vae, loss_config: InfinityLossConfig, images: jax.Array, rng: jax.Array,
                  **condition) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of one official train step's forward: targets with self-correction, the
  condition (`labels=` or `text=`, `text_lengths=`) dropped to the null one with probability
  `cond_drop_rate`, scale-reweighted bit cross-entropy."""
  c = loss_config
  noise_rng, drop_rng = jax.random.split(rng)
  schedule, inputs, labels = training_targets(vae, model.config, c, images, noise_rng)
  full_schedule, _ = training_schedules(vae, model.config, images.shape)
  drop = jax.random.uniform(drop_rng, (images.shape[0],)) < c.cond_drop_rate
  logits = model(inputs, schedule, drop=drop, **condition)
  weights = scale_loss_weights(full_schedule, num_train_scales=schedule.num_scales,
                               reweight_by_scale=c.reweight_by_scale)
  loss = bitwise_loss(logits, labels, jnp.asarray(weights), label_smoothing=c.label_smoothing)
  accuracy = bit_accuracy(logits, labels)
  last = schedule.offsets[-1]
  metrics = {
      "bits_per_bit": bits_per_bit(logits, labels),
      "bit_accuracy": jnp.mean(accuracy),
      "bit_accuracy_last_scale": jnp.mean(accuracy[:, last:]),
  }
  return loss, metrics
