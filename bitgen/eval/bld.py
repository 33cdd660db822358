"""Evaluation of Binary Latent Diffusion: the prior's NLL bound in bits per bit, the bit-frequency
baseline, and the autoencoder's reconstruction PSNR.

NLL bound (the diffusion ELBO, per sample, in nats, divided by the number of bits and ln 2):

  -log p(x_0) <= KL(q(x_T | x_0) || Bernoulli(1/2))                               (0 when k_T = 0)
               + sum_{t=2..T} E_{x_t ~ q(x_t | x_0)} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
               + E_{x_1 ~ q(x_1 | x_0)} [-log p(x_0 | x_1)]

over all T one-step transitions, one draw of x_t per (sample, t). p(x_0 = 1 | x_1) is the
denoiser's prediction at t = 1. Two reverse kernels built from the predicted p0 = P(x_0 = 1 | x_t):
  "marginal": p(x_{t-1} | x_t) = sum_{x_0} q(x_{t-1} | x_t, x_0) p0(x_0)  (exact for a denoiser that
              predicts the true P(x_0 | x_t), so the bound is then tight);
  "sampler":  the official sampling posterior (`binary_diffusion.posterior_one`), which weighs
              q(x_t | x_{t-1}) by the x_0-averaged q(x_{t-1} | x_0) and so counts the evidence of x_t
              twice: a looser bound even for a perfect denoiser.
Both come from one pass.

Bit-frequency baseline: every bit (position, channel) an independent Bernoulli with its marginal
frequency f on training bits; its entropy H(f) in bits per bit, and its cross-entropy on held-out bits.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.eval import metrics
from bitgen.sample import binary_diffusion as bd

POSTERIORS = ("marginal", "sampler")
_PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] inside the logs


def _bernoulli_kl(q: jax.Array, p: jax.Array) -> jax.Array:
  """KL(Bernoulli(q) || Bernoulli(p)) elementwise, in nats."""
  p = jnp.clip(p, _PROB_EPS, 1 - _PROB_EPS)
  return (jax.scipy.special.xlogy(q, q) - q * jnp.log(p)
          + jax.scipy.special.xlogy(1 - q, 1 - q) - (1 - q) * jnp.log1p(-p))


def _nll_terms(graphdef, state, x0, labels, drop_labels, key, k_final, b_final, beta, *,
               total_steps: int, p_flip: bool):
  """Per-sample ELBO in nats {"marginal": (B,), "sampler": (B,)}; see the module docstring."""
  model = nnx.merge(graphdef, state)
  x0 = x0.astype(jnp.float32)
  batch = x0.shape[0]
  sum_bits = lambda v: jnp.sum(v, axis=tuple(range(1, v.ndim)))
  prior = sum_bits(_bernoulli_kl(k_final[total_steps] * x0 + b_final[total_steps], 0.5))

  def step(totals, t):
    x_t = jax.random.uniform(jax.random.fold_in(key, t), x0.shape) < k_final[t] * x0 + b_final[t]
    steps = jnp.full((batch,), t, jnp.int32)
    logits = model(x_t.astype(jnp.uint8), steps, labels, drop_labels=drop_labels)
    x0_logits = bd.flip_to_x0_logits(logits, x_t) if p_flip else logits
    p0 = jax.nn.sigmoid(x0_logits)
    # One-step kernel t -> t-1 (the order of operations of `binary_diffusion.skip_kernel`).
    kernels = dict(k_prev=k_final[t - 1], b_prev=b_final[t - 1],
                   kernel_one=beta[t] + 0.5 * (1 - beta[t]), kernel_zero=0.5 * (1 - beta[t]))
    q_one = bd.posterior_one(jnp.ones_like(x0), x_t, **kernels)   # q(x_{t-1} = 1 | x_t, x_0 = 1)
    q_zero = bd.posterior_one(jnp.zeros_like(x0), x_t, **kernels)
    q_true = x0 * q_one + (1 - x0) * q_zero
    reverse = {"marginal": p0 * q_one + (1 - p0) * q_zero,
               "sampler": bd.posterior_one(p0, x_t, **kernels)}
    decoder_nll = sum_bits(bd.bce_with_logits(x0_logits, x0))  # -log p(x_0 | x_1), used at t = 1
    totals = {name: totals[name] + jnp.where(
        t == 1, decoder_nll, sum_bits(_bernoulli_kl(q_true, reverse[name]))) for name in POSTERIORS}
    return totals, None

  totals, _ = jax.lax.scan(step, {name: prior for name in POSTERIORS},
                           jnp.arange(1, total_steps + 1))
  return totals


_nll_terms_jit = jax.jit(_nll_terms, static_argnames=("graphdef", "total_steps", "p_flip"))


def nll_bound(denoiser: nnx.Module, x0, key: jax.Array, *, schedule: bd.NoiseSchedule,
              labels=None, unconditional: bool = False, p_flip: bool = True) -> dict[str, np.ndarray]:
  """Per-sample NLL bound in bits per bit of x0 (B, L, C) bits: {"marginal": (B,), "sampler": (B,)}.

  labels: (B,) class ids for a class-conditional denoiser; `unconditional` masks the class token out
  (the guidance-dropout mode; then labels may be None). Monte Carlo over x_t: one draw per step.
  """
  x0 = jnp.asarray(x0)
  config = denoiser.config
  if x0.ndim != 3 or x0.shape[1:] != (config.num_positions, config.num_bits):
    raise ValueError(f"x0 must be (B, {config.num_positions}, {config.num_bits}) bits, got {x0.shape}")
  if not (jnp.issubdtype(x0.dtype, jnp.integer) or x0.dtype == jnp.bool_):
    raise TypeError(f"x0 must be integer or bool bits, got {x0.dtype}")
  conditional = getattr(config, "num_classes", 0) > 0
  drop = None
  if conditional:
    if labels is None and not unconditional:
      raise ValueError("this denoiser is class-conditional: pass labels, or unconditional=True")
    labels = jnp.zeros(x0.shape[:1], jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    if labels.shape != x0.shape[:1]:
      raise ValueError(f"labels must have shape ({x0.shape[0]},), got {labels.shape}")
    drop = jnp.full(x0.shape[:1], unconditional)
  elif labels is not None or unconditional:
    raise ValueError("labels / unconditional given, but this denoiser is unconditional")
  graphdef, state = nnx.split(denoiser)
  nats = _nll_terms_jit(graphdef, state, x0, labels, drop, key, jnp.asarray(schedule.k_final),
                        jnp.asarray(schedule.b_final), jnp.asarray(schedule.beta),
                        total_steps=schedule.total_steps, p_flip=p_flip)
  per_bit = np.log(2.0) * np.prod(x0.shape[1:])
  return {name: np.asarray(value) / per_bit for name, value in nats.items()}


def bit_frequencies(bits) -> np.ndarray:
  """(N, ...) {0,1} bits -> (...) float64 frequency of 1 per bit."""
  bits = np.asarray(bits)
  if bits.ndim < 2 or bits.shape[0] == 0:
    raise ValueError(f"bit_frequencies needs (N, ...) bits with N > 0, got shape {bits.shape}")
  return bits.reshape(bits.shape[0], -1).mean(axis=0, dtype=np.float64).reshape(bits.shape[1:])


def frequency_entropy_bits(frequencies) -> float:
  """Mean binary entropy (bits) of independent Bernoulli bits with these frequencies."""
  f = np.asarray(frequencies, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -(np.where(f > 0, f * np.log2(f), 0.0) + np.where(f < 1, (1 - f) * np.log2(1 - f), 0.0))
  return float(h.mean())


def frequency_cross_entropy_bits(frequencies, bits, *, count: int) -> float:
  """Bits per bit of `bits` (N, ...) under independent Bernoulli(frequency) bits, the frequencies
  Laplace-smoothed as (count * f + 1) / (count + 2) from `count` training samples."""
  f = (count * np.asarray(frequencies, np.float64) + 1) / (count + 2)
  bits = np.asarray(bits, np.float64)
  return float(-np.mean(bits * np.log2(f) + (1 - bits) * np.log2(1 - f)))


@functools.partial(nnx.jit, static_argnames=("sampled",))
def _encode(autoencoder, images, key, sampled: bool):
  bits = autoencoder.encode(images, key=key if sampled else None)
  return bits.reshape(bits.shape[0], -1, bits.shape[-1])


def _encode_all(autoencoder, images: np.ndarray, *, batch_size: int, sampled: bool, seed: int):
  out = []
  for i in range(0, len(images), batch_size):
    key = jax.random.fold_in(jax.random.key(seed), i)
    out.append(np.asarray(_encode(autoencoder, jnp.asarray(images[i:i + batch_size]), key, sampled)))
  return np.concatenate(out)


@nnx.jit
def _bit_entropy(autoencoder, images):
  p = jnp.clip(autoencoder.encode_probs(images), _PROB_EPS, 1 - _PROB_EPS)
  return -jnp.mean(p * jnp.log2(p) + (1 - p) * jnp.log2(1 - p), axis=(1, 2, 3))


def encoder_bit_entropy(autoencoder: nnx.Module, images: np.ndarray, *, batch_size: int) -> float:
  """Mean binary entropy (bits per bit) of the encoder's probabilities p on `images`: the entropy of
  sampled bits ~ Bernoulli(p) given the image, a floor under any prior's NLL on such bits."""
  values = [np.asarray(_bit_entropy(autoencoder, jnp.asarray(images[i:i + batch_size])))
            for i in range(0, len(images), batch_size)]
  return float(np.concatenate(values).mean())


def _bound_mean(denoiser, bits, labels, *, schedule, p_flip, batch_size, seed, unconditional):
  totals = {name: [] for name in POSTERIORS}
  for i in range(0, len(bits), batch_size):
    chunk_labels = None if labels is None else labels[i:i + batch_size]
    out = nll_bound(denoiser, bits[i:i + batch_size], jax.random.fold_in(jax.random.key(seed), i),
                    schedule=schedule, labels=chunk_labels, unconditional=unconditional,
                    p_flip=p_flip)
    for name in POSTERIORS:
      totals[name].append(out[name])
  return {name: float(np.concatenate(v).mean()) for name, v in totals.items()}


def evaluate_prior(denoiser: nnx.Module, autoencoder: nnx.Module, config, *, batch_size: int = 64,
                   train_batches: int = 8, seed: int = 0) -> dict[str, Any]:
  """The prior of `config` (a `configs/bld.py:photos_prior` training config) on its data.

  Training bits: `train_batches` batches of the training stream (the crops the prior was trained
  on), encoded as in training (`config.prior.ae_bits`). Held-out bits: the eval split (photos never
  seen in training, whose photo-id classes were never trained either, so the bound there is the
  unconditional one: class token masked, the guidance-dropout mode). Also reported: the bound on
  fresh crops of the training photos, conditional on their photo id and unconditional, and, for
  sampled bits, `encoder_bit_entropy` (the noise floor of the held-out bits).
  """
  from bitgen import data  # pylint: disable=g-import-not-at-top
  from bitgen.train import bld as bld_train  # pylint: disable=g-import-not-at-top
  from bitgen.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  sampled = bld_train.prior_options(config)["ae_bits"] == "sample"
  diffusion = dict(config.diffusion)
  schedule = bd.noise_schedule(diffusion["total_steps"], diffusion["beta_type"])
  p_flip = bool(diffusion["p_flip"])
  conditional = denoiser.config.num_classes > 0

  def stream(stream_seed):
    it = iter(data.make_pipeline(config.data, split="train", batch_size=batch_size, seed=stream_seed))
    batches = [next(it) for _ in range(train_batches)]
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))

  encode = functools.partial(_encode_all, autoencoder, batch_size=batch_size, sampled=sampled)
  train_images, _ = stream(config.train.seed)
  train_bits = encode(train_images, seed=seed)
  freqs = bit_frequencies(train_bits)
  held_out = data.eval_images(config.data)
  held_bits = encode(held_out["image"], seed=seed + 1)
  fresh_images, fresh_labels = stream(config.train.seed + 1)
  fresh_bits = encode(fresh_images, seed=seed + 2)
  bound = functools.partial(_bound_mean, denoiser, schedule=schedule, p_flip=p_flip,
                            batch_size=batch_size, seed=seed)
  cross_entropy = functools.partial(frequency_cross_entropy_bits, freqs, count=len(train_bits))
  report = {
      "bits_per_image": int(np.prod(train_bits.shape[1:])),
      "train_bits_images": len(train_bits),
      "baseline_entropy": frequency_entropy_bits(freqs),
      "held_out": {
          "images": len(held_bits),
          "nll_bound": bound(held_bits, None, unconditional=conditional),
          "baseline_cross_entropy": cross_entropy(held_bits),
      },
      "train_photos_fresh_crops": {
          "images": len(fresh_bits),
          "baseline_cross_entropy": cross_entropy(fresh_bits),
      },
  }
  if sampled:
    report["held_out"]["encoder_bit_entropy"] = encoder_bit_entropy(
        autoencoder, held_out["image"], batch_size=batch_size)
  fresh = report["train_photos_fresh_crops"]
  if conditional:
    fresh["nll_bound_conditional"] = bound(fresh_bits, fresh_labels, unconditional=False)
    fresh["nll_bound_unconditional"] = bound(fresh_bits, None, unconditional=True)
  else:
    fresh["nll_bound"] = bound(fresh_bits, None, unconditional=False)
  return report


def evaluate_autoencoder(autoencoder: nnx.Module, data_config, *, batch_size: int = 64) -> dict[str, Any]:
  """Held-out reconstruction (thresholded bits) PSNR / SSIM over the eval crops of `data_config`."""
  from bitgen import data  # pylint: disable=g-import-not-at-top
  images = data.eval_images(data_config)["image"]

  @nnx.jit
  def scores(model, batch):
    recon, _ = model(batch)
    return metrics.psnr_ssim(batch, jnp.clip(recon, -1, 1))

  psnr, ssim = [], []
  for i in range(0, len(images), batch_size):
    p, s = scores(autoencoder, jnp.asarray(images[i:i + batch_size]))
    psnr.append(np.asarray(p))
    ssim.append(np.asarray(s))
  config = autoencoder.config
  return {"images": len(images), "psnr": float(np.concatenate(psnr).mean()),
          "ssim": float(np.concatenate(ssim).mean()),
          "bits_per_pixel": config.latent_size ** 2 * config.num_bits / config.image_size ** 2}
