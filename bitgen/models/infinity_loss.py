"""Infinity's training loss (official `trainer.py::train_step`, `use_bit_label=1`, `bitloss_type='mean'`).

Per bit, a 2-way cross-entropy between logits (B, L, 2d) viewed as (B, L, d, 2) and the bit labels
(B, L, d); averaged over the d bits of a token, then a weighted sum over tokens (weights sum to 1)
and a mean over the batch. With `reweight_loss_by_scale`, token weights of scale k are
proportional to sqrt(h_K w_K) / sqrt(h_k w_k) (K = last scale of the full schedule), so each scale
counts about as much as its side length; otherwise 1 / L.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.models.infinity_schedules import Schedule


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
