"""Bernoulli diffusion on bits (Binary Latent Diffusion, Wang et al. 2023): schedules, loss, sampler.

Forward process, per bit: q(x_t | x_0) = Bernoulli(k_t x_0 + b_t) with b_t = (1 - k_t) / 2, built from
one-step kernels q(x_t | x_{t-1}) = Bernoulli(beta_t x_{t-1} + (1 - beta_t) / 2); k_T = 0, so x_T is
fair coin flips. Schedules (`linear`, `cos`, `sigmoid`) are computed as the official
`noise_scheduler`: float64 numpy, stored float32, index t in 0..T (index 0 is the identity).

The denoiser predicts, per bit, the logit that x_0 differs from x_t (`p_flip`, the released
setting) or the logit of x_0 itself. Sampling walks a descending list of steps T = s_0 > ... > s_n = 1;
from s_i to s_{i+1} it draws x_{s_{i+1}} from the posterior q(x_{s_{i+1}} | x_{s_i}, x_0) averaged
over the predicted x_0, with the one-step kernels between the two steps composed; at t = 1 the
sample is the thresholded prediction p(x_0 = 1) > 0.5. Logits are divided by the temperature and
mixed for classifier-free guidance as (1 + w) l_cond - w l_uncond.

Bits are (B, L, C) with L = h*w row-major latent positions and C bits per position (the
autoencoder's (B, h, w, C) reshaped).
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BetaType = Literal["linear", "cos", "sigmoid"]
LossType = Literal["balanced", "plain"]
LossFinal = Literal["mean", "weighted"]
Spacing = Literal["linspace", "even"]


# --- noise schedules ---

@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """Arrays of shape (T + 1,) float32 indexed by the step t; index 0 is the identity."""

  kind: str
  k_final: np.ndarray   # q(x_t | x_0) = k_final[t] x_0 + b_final[t]
  b_final: np.ndarray
  beta: np.ndarray      # q(x_t | x_{t-1}) = beta[t] x_{t-1} + (1 - beta[t]) / 2
  cumbeta: np.ndarray   # cumulative product of beta

  @property
  def total_steps(self) -> int:
    return self.k_final.shape[0] - 1


def _sigmoid_schedule(t, start=0.0, end=3.0, tau=0.8):
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
  out = (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
  return np.clip(out, 0.0, 1.0)


def noise_schedule(total_steps: int, beta_type: BetaType = "linear") -> NoiseSchedule:
  """The official `noise_scheduler(total_steps, beta_type)` buffers."""
  if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
    raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
  steps = int(total_steps)
  if beta_type == "linear":
    beta = 1 - 1 / (steps - np.arange(1, steps + 1) + 1)
    k, b = [1.0], [0.0]
    for i in range(steps):
      k.append(k[-1] * beta[i])
      b.append(beta[i] * b[-1] + 0.5 * (1 - beta[i]))
    k_final, b_final = np.array(k[1:]), np.array(b[1:])
  elif beta_type in ("cos", "sigmoid"):
    grid = np.linspace(0.0, 1.0, steps + 1)
    k_all = 0.5 + 0.5 * np.cos(grid * np.pi) if beta_type == "cos" else _sigmoid_schedule(grid)
    beta = k_all[1:] / k_all[:-1]
    k_final, b_final = k_all[1:], (1 - k_all[1:]) * 0.5
  else:
    raise ValueError(f"unknown beta_type {beta_type!r}; expected one of {BetaType.__args__}")
  k_final = np.hstack([1, k_final]).astype(np.float32)
  b_final = np.hstack([0, b_final]).astype(np.float32)
  beta = np.hstack([1, beta]).astype(np.float32)
  return NoiseSchedule(beta_type, k_final, b_final, beta, np.cumprod(beta, dtype=np.float32))


def _per_sample(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  return jnp.asarray(table)[t].reshape(-1, *([1] * (ndim - 1)))


def q_probs(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array) -> jax.Array:
  """P(x_t = 1 | x_0) = k_final[t] x_0 + b_final[t]; x0 (B, ...) in [0, 1], t (B,) int."""
  x0 = x0.astype(jnp.float32)
  return _per_sample(schedule.k_final, t, x0.ndim) * x0 + _per_sample(schedule.b_final, t, x0.ndim)


# --- training loss ---

def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy, PyTorch's stable form."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def flip_to_x0_logits(logits: jax.Array, x_t: jax.Array) -> jax.Array:
  """Flip logits (x_0 != x_t) -> logits of x_0 = 1."""
  x_t = x_t.astype(logits.dtype)
  return x_t * -logits + (1 - x_t) * logits


def diffusion_loss(
    logits: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, *, total_steps: int,
    p_flip: bool = True, loss_type: LossType = "balanced", focal_gamma: float = 0.0,
    loss_final: LossFinal = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The official `BinaryDiffusion._train_loss` given the denoiser output. Returns (loss, metrics).

  logits, x0, x_t: (B, L, C); t: (B,) steps 1..T.
  balanced: focal BCE (gamma `focal_gamma`, 0 = plain BCE) on the target x_0 xor x_t (p_flip) or
    x_0, each sample's terms weighted by the other class's frequency: positives by 1 - f, negatives
    by f, f = fraction of positive targets in the sample (the official `focal_loss(alpha=-1)`).
  plain: unweighted BCE of the x_0 logits against x_0.
  (Without p_flip the reference passes alpha=focal to `focal_loss`, i.e. no class balance for
  focal=0; here `balanced` always balances, so use `plain` to reproduce that run.)
  loss_final: mean, or weighted by 1 - (t - 1) / T per sample.
  metrics: bce_loss (unweighted mean), acc (fraction of bits with (x_0 logit > 0) == x_0).
  """
  if loss_type not in LossType.__args__:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LossType.__args__}")
  if loss_final not in LossFinal.__args__:
    raise ValueError(f"unknown loss_final {loss_final!r}; expected one of {LossFinal.__args__}")
  x0 = x0.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  x0_logits = flip_to_x0_logits(logits, x_t) if p_flip else logits
  if loss_type == "balanced":
    target = jnp.logical_xor(x0 > 0.5, x_t > 0.5).astype(jnp.float32) if p_flip else x0
    p = jax.nn.sigmoid(logits)
    p_wrong = jnp.clip(1 - (p * target + (1 - p) * (1 - target)), 1e-6, 1 - 1e-6)
    focal = bce_with_logits(logits, target) * p_wrong ** focal_gamma
    axes = tuple(range(1, target.ndim))
    positive = jnp.sum(target, axis=axes, keepdims=True) / np.prod(target.shape[1:])
    terms = ((1 - positive) * target + positive * (1 - target)) * focal
  else:
    terms = bce_with_logits(x0_logits, x0)
  if loss_final == "weighted":
    weight = _per_sample(1 - np.arange(total_steps + 1, dtype=np.float32) / total_steps, t - 1, terms.ndim)
    loss = jnp.mean(weight * terms)
  else:
    loss = jnp.mean(terms)
  acc = jnp.mean(((x0_logits > 0) == (x0 > 0.5)).astype(jnp.float32))
  return loss, {"loss": loss, "bce_loss": jnp.mean(terms), "acc": jax.lax.stop_gradient(acc)}


def training_loss(
    denoiser: nnx.Module, x0: jax.Array, key: jax.Array, *, schedule: NoiseSchedule,
    labels: jax.Array | None = None, label_drop_prob: float = 0.0, p_flip: bool = True,
    loss_type: LossType = "balanced", focal_gamma: float = 0.0, loss_final: LossFinal = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Draws t ~ U{1..T} and x_t ~ q(x_t | x_0) per sample, runs the denoiser, returns the loss.

  x0: (B, L, C) bits. `label_drop_prob` drops each sample's class token with that probability
  (classifier-free guidance training; the official code drops the whole batch's labels at once).
  """
  key_t, key_x, key_drop = jax.random.split(key, 3)
  t = jax.random.randint(key_t, (x0.shape[0],), 1, schedule.total_steps + 1)
  x_t = (jax.random.uniform(key_x, x0.shape) < q_probs(schedule, x0, t)).astype(jnp.uint8)
  drop = None
  if labels is not None and label_drop_prob > 0:
    drop = jax.random.bernoulli(key_drop, label_drop_prob, (x0.shape[0],))
  logits = denoiser(x_t, t, labels, drop_labels=drop)
  return diffusion_loss(logits, x0, x_t, t, total_steps=schedule.total_steps, p_flip=p_flip,
                        loss_type=loss_type, focal_gamma=focal_gamma, loss_final=loss_final)


# --- posterior over skipped steps ---

def skip_kernel(schedule: NoiseSchedule, t: int, t_prev: int) -> tuple[np.float32, np.float32]:
  """The one-step kernels beta[t], beta[t-1], ..., beta[t_prev+1] composed, applied to the values
  1 and 0: (P(x_t = v | x_{t_prev} = 1), P(x_t = v | x_{t_prev} = 0)) for v = 1. Computed in
  float32 in the reference's order of operations."""
  values = np.array([1.0, 0.0], np.float32)
  for m in range(t - t_prev):
    k = schedule.beta[t - m]
    values = values * k + np.float32(0.5) * (np.float32(1) - k)
  return values[0], values[1]


def posterior_one(
    p0: jax.Array, x_t: jax.Array, *, k_prev, b_prev, kernel_one, kernel_zero
) -> jax.Array:
  """P(x_{t_prev} = 1 | x_t, x_0 ~ Bernoulli(p0)), the reference's op sequence.

  k_prev, b_prev: k_final[t_prev], b_final[t_prev]; kernel_one/zero: `skip_kernel(t, t_prev)`.
  """
  x_is_one = x_t.astype(bool)
  prior_one = k_prev * p0 + b_prev
  prior_zero = k_prev * (1 - p0) + b_prev
  like_one = jnp.where(x_is_one, kernel_one, kernel_zero)   # P(x_t | x_{t_prev} = 1)
  like_zero = jnp.where(x_is_one, kernel_zero, kernel_one)  # P(x_t | x_{t_prev} = 0)
  unnormed_one, unnormed_zero = prior_one * like_one, prior_zero * like_zero
  return unnormed_one / (unnormed_one + unnormed_zero)


def posterior(schedule: NoiseSchedule, p0: jax.Array, x_t: jax.Array, t: int, t_prev: int) -> jax.Array:
  """P(x_{t_prev} = 1 | x_t, predicted p0 = P(x_0 = 1)) for one transition t -> t_prev < t."""
  if not 0 <= t_prev < t <= schedule.total_steps:
    raise ValueError(f"need 0 <= t_prev < t <= T={schedule.total_steps}, got t={t}, t_prev={t_prev}")
  one, zero = skip_kernel(schedule, t, t_prev)
  return posterior_one(p0, x_t, k_prev=schedule.k_final[t_prev], b_prev=schedule.b_final[t_prev],
                       kernel_one=one, kernel_zero=zero)


# --- sampling ---

def sampling_steps(total_steps: int, steps: int | Sequence[int], spacing: Spacing = "linspace") -> np.ndarray:
  """The descending steps visited, from T down to 1.

  An int `steps` picks them: "linspace" is the official rule (all of 1..T when steps == T, else
  1 + int(linspace(0, 1, steps) * (T - 1))), valid for any 1 <= steps <= T; "even" takes equal
  strides and so needs (T - 1) divisible by (steps - 1). A sequence gives them explicitly.
  """
  if isinstance(steps, (int, np.integer)):
    n = int(steps)
    if n < 1:
      raise ValueError(f"sampling steps must be >= 1, got {n}")
    if n > total_steps:
      raise ValueError(
          f"sampling steps ({n}) exceed the {total_steps} diffusion steps the model was trained with")
    if spacing == "linspace":
      visited = np.arange(1, total_steps + 1)
      if n != total_steps:
        visited = visited[np.array(np.linspace(0.0, 1.0, n) * (total_steps - 1), int)]
    elif spacing == "even":
      if n == 1 or (total_steps - 1) % (n - 1):
        raise ValueError(
            f"'even' spacing needs T - 1 = {total_steps - 1} divisible by steps - 1 = {n - 1} "
            f"(steps={n}); use spacing='linspace' or a step count with (T-1) % (steps-1) == 0")
      visited = np.arange(1, total_steps + 1, (total_steps - 1) // (n - 1))
    else:
      raise ValueError(f"unknown spacing {spacing!r}; expected one of {Spacing.__args__}")
    return visited[::-1].copy()
  visited = np.asarray(list(steps), np.int64)
  if visited.ndim != 1 or visited.size == 0:
    raise ValueError(f"explicit sampling steps must be a non-empty list of ints, got {steps!r}")
  if visited[0] != total_steps or visited[-1] != 1 or np.any(np.diff(visited) >= 0):
    raise ValueError(
        f"explicit sampling steps must descend strictly from T={total_steps} to 1, got {visited.tolist()}")
  return visited


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """Everything static about one sampling run (hashable: it keys the jit cache)."""

  steps: tuple[int, ...]
  k_prev: tuple[float, ...]
  b_prev: tuple[float, ...]
  kernel_one: tuple[float, ...]
  kernel_zero: tuple[float, ...]
  shape: tuple[int, int, int]
  p_flip: bool
  guided: bool
  conditional: bool
  injected_noise: bool = False
  trajectory: bool = False


def sampling_plan(
    denoiser_config, *, batch: int, schedule: NoiseSchedule, steps: int | Sequence[int],
    spacing: Spacing = "linspace", p_flip: bool = True, guided: bool = False,
    injected_noise: bool = False, trajectory: bool = False,
) -> SamplingPlan:
  """The plan of `sample_bits` for a denoiser config (num_positions, num_bits, num_classes): the
  visited steps (`sampling_steps`, which checks the step count) and their posterior constants."""
  conditional = getattr(denoiser_config, "num_classes", 0) > 0
  if guided and not conditional:
    raise ValueError("classifier-free guidance needs a class-conditional denoiser and labels")
  visited = sampling_steps(schedule.total_steps, steps, spacing)
  kernels = [skip_kernel(schedule, int(t), int(tp)) for t, tp in zip(visited[:-1], visited[1:])]
  return SamplingPlan(
      steps=tuple(int(t) for t in visited),
      k_prev=tuple(float(schedule.k_final[tp]) for tp in visited[1:]),
      b_prev=tuple(float(schedule.b_final[tp]) for tp in visited[1:]),
      kernel_one=tuple(float(one) for one, _ in kernels),
      kernel_zero=tuple(float(zero) for _, zero in kernels),
      shape=(batch, denoiser_config.num_positions, denoiser_config.num_bits), p_flip=p_flip,
      guided=guided, conditional=conditional, injected_noise=injected_noise, trajectory=trajectory)


def check_labels(plan: SamplingPlan, labels) -> jax.Array | None:
  """`labels` as (batch,) int32 when the plan's denoiser is class-conditional, else None."""
  batch = plan.shape[0]
  if plan.conditional and labels is None:
    raise ValueError("this denoiser is class-conditional (num_classes > 0): pass labels (batch,)")
  if not plan.conditional and labels is not None:
    raise ValueError("labels given, but this denoiser is unconditional (num_classes=0)")
  if labels is None:
    return None
  labels = jnp.asarray(labels, jnp.int32)
  if labels.shape != (batch,):
    raise ValueError(f"labels must have shape ({batch},), got {labels.shape}")
  return labels


def _denoised_probs(model, plan: SamplingPlan, x_t, t, labels, temperature, guidance):
  """P(x_0 = 1 | x_t) with temperature and classifier-free guidance."""
  batch = x_t.shape[0]
  steps = jnp.full((batch,), t, jnp.int32)
  if plan.guided:
    # One pass over [cond; uncond]: the class token is masked out for the second half.
    drop = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    logits = model(jnp.concatenate([x_t, x_t]), jnp.concatenate([steps, steps]),
                   jnp.concatenate([labels, labels]), drop_labels=drop)
    cond, uncond = logits[:batch] / temperature, logits[batch:] / temperature
    logits = (1 + guidance) * cond - guidance * uncond
  else:
    logits = model(x_t, steps, labels if plan.conditional else None) / temperature
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  if plan.p_flip:
    x = x_t.astype(p.dtype)
    p = x * (1 - p) + (1 - x) * p
  return p


def sample_bits(model, plan: SamplingPlan, key, labels, temperature, guidance, noise=None):
  """The sampler as a traceable function (call it inside a jit): one `lax.scan` over the plan's
  transitions, then the thresholded prediction at the last step. Returns x_0, or (x_0, trajectory)
  when `plan.trajectory`; see `sample` for the arguments."""
  n = len(plan.steps)
  keys = jax.random.split(key, n)

  def uniform(i):
    return noise[i] if plan.injected_noise else jax.random.uniform(keys[i], plan.shape)

  x_t = (uniform(0) < 0.5).astype(jnp.uint8)

  def step(x_t, xs):
    i, t, k_prev, b_prev, one, zero = xs
    p0 = _denoised_probs(model, plan, x_t, t, labels, temperature, guidance)
    post = posterior_one(p0, x_t, k_prev=k_prev, b_prev=b_prev, kernel_one=one, kernel_zero=zero)
    x_prev = (uniform(i) < post).astype(jnp.uint8)
    return x_prev, x_t

  xs = (jnp.arange(1, n), jnp.asarray(plan.steps[:-1], jnp.int32),
        *(jnp.asarray(v, jnp.float32) for v in (plan.k_prev, plan.b_prev, plan.kernel_one,
                                                  plan.kernel_zero)))
  x_t, visited = jax.lax.scan(step, x_t, xs)
  p0 = _denoised_probs(model, plan, x_t, plan.steps[-1], labels, temperature, guidance)
  x0 = (p0 > 0.5).astype(jnp.uint8)
  if plan.trajectory:
    return x0, jnp.concatenate([visited, x_t[None]])
  return x0


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _sample_jit(graphdef, state, key, labels, temperature, guidance, noise, plan: SamplingPlan):
  return sample_bits(nnx.merge(graphdef, state), plan, key, labels, temperature, guidance, noise)


def sample(
    denoiser: nnx.Module, key: jax.Array, *, batch: int, schedule: NoiseSchedule,
    steps: int | Sequence[int], spacing: Spacing = "linspace", temperature: float = 1.0,
    guidance: float | None = None, labels: jax.Array | None = None, p_flip: bool = True,
    noise: jax.Array | None = None, return_trajectory: bool = False,
):
  """Draws (batch, L, C) uint8 bits x_0 from the Bernoulli diffusion prior (jit-compiled).

  denoiser: `bitgen.models.bld_denoiser.Denoiser` (or any module with its call signature).
  steps: how many denoiser evaluations (<= T; see `sampling_steps`), or the explicit steps.
  guidance: classifier-free guidance weight w (None or 0: no unconditional pass); needs labels.
  labels: (batch,) class ids for a class-conditional denoiser, else None.
  noise: optional (len(steps), batch, L, C) uniforms replacing the draws from `key`: noise[0]
    makes x_T = (U < 0.5), noise[i] the Bernoulli draw of step i (the last row is unused).
  return_trajectory: also return the (len(steps), batch, L, C) x_t at every visited step.
  Deterministic given `key` (and `noise`). For repeated sampling with fixed settings (and the
  decode fused into the same jit) see `bitgen.sample.bld.sampler`.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  plan = sampling_plan(denoiser.config, batch=batch, schedule=schedule, steps=steps,
                       spacing=spacing, p_flip=p_flip, guided=guidance is not None and guidance != 0,
                       injected_noise=noise is not None, trajectory=return_trajectory)
  labels = check_labels(plan, labels)
  if noise is not None:
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != (len(plan.steps), *plan.shape):
      raise ValueError(f"noise must have shape {(len(plan.steps), *plan.shape)}, got {noise.shape}")
  graphdef, state = nnx.split(denoiser)
  return _sample_jit(graphdef, state, key, labels, jnp.float32(temperature),
                     jnp.float32(guidance or 0.0), noise, plan=plan)
