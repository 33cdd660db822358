"""Next-scale generation for Infinity with a KV cache, CFG on logits and per-bit top-k / top-p.

Official `Infinity.autoregressive_infer_cfg` (`cfg_insertion_layer=[0]`, bit labels, VAE decode).
For scale k of the schedule, in order:

  tokens   = SOS = cond + pos_start (k = 0), else word_embed(next input); + lvl_embed(k)
  blocks   : self-attention of the scale's tokens over the cached keys/values of scales <= k
             (RoPE rows of the scale's own positions), cross-attention to the text, FFN
  logits   = head(AdaLN(h)) / tau_k, then cfg_k * cond + (1 - cfg_k) * uncond   (per bit: 2 logits)
  bits     ~ categorical(top-k / top-p filtered logits)          (top_k=1: argmax)
  summed  += bilinear(bits_to_codes(bits) -> latent grid);  next input = bilinear(summed -> next grid)

The batch is doubled for guidance: rows [0, B) conditional, [B, 2B) the null caption (or null class).
`generate` is compiled once per (model graph, schedule, batch, top_k, top_p, cfg on/off); cfg and tau
values are traced (changing them does not retrace); randomness comes only from `key`.
Images: `vae.decode(output.latent)` (RGB, [-1, 1]).
"""

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.models.infinity import Condition, Infinity
from bitgen.models.infinity_schedules import Schedule
from bitgen.nn import infinity_blocks
from bitgen.quantizers import multiscale


@flax.struct.dataclass
class Generation:
  """bits: per scale [B, h_k, w_k, d_vae] (VAE layout); latent: [B, H, W, d_vae] summed codes;
  logits: per scale (B, h_k * w_k * d, 2) guided, tempered logits (empty unless asked for)."""

  bits: tuple[jax.Array, ...]
  latent: jax.Array
  logits: tuple[jax.Array, ...]


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Official `sample_with_top_k_top_p_`: -inf outside the top-k / top-p (nucleus) set, last axis."""
  num = logits.shape[-1]
  if 0 < top_k < num:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    remove_sorted = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= 1 - top_p
    remove_sorted = remove_sorted.at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _per_scale(value, num_scales: int, name: str) -> jax.Array:
  values = np.asarray(value, np.float32)
  if values.ndim == 0:
    values = np.full((num_scales,), values)
  if values.shape != (num_scales,):
    raise ValueError(
        f"{name} must be a scalar or one value per scale ({num_scales}), got shape {values.shape}")
  return jnp.asarray(values)


def _vae_grids(model: Infinity, schedule: Schedule) -> tuple[tuple[int, int], ...]:
  factor = 2 if model.config.spatial_patchify else 1
  return tuple((h * factor, w * factor) for h, w in schedule.grids)


def _scale_step(model: Infinity, condition: Condition, x: jax.Array, k: int, schedule: Schedule,
                cache: list[tuple[jax.Array, jax.Array]], cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Runs the tokens [2B, n_k, C] of scale k through every block, appending to the KV cache."""
  start = schedule.offsets[k]
  end = start + schedule.tokens_per_scale[k]
  cos_k, sin_k = cos[start:end], sin[start:end]
  x = x + model.lvl_embed(jnp.full((x.shape[1],), k, jnp.int32))[None]
  for i, block in enumerate(model.blocks):
    gamma1, gamma2, scale1, scale2, shift1, shift2 = block.modulation(condition.shared_gss)
    x_sa = infinity_blocks.plain_layer_norm(x, block.norm_eps) * (scale1 + 1) + shift1
    q, key, value = block.sa.qkv(x_sa, cos_k, sin_k)
    keys, values = cache[i]
    keys = keys.at[:, start:end].set(key)
    values = values.at[:, start:end].set(value)
    cache[i] = (keys, values)
    x = x + block.sa.attend(q, keys[:, :end], values[:, :end], None) * gamma1
    x = block.cross_and_ffn(x, gamma2, scale2, shift2, condition.text, condition.text_valid)
  return x


def _sample_bits(key: jax.Array, logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """(B, n, 2d) -> (B, n, d) uint8 bits drawn per bit."""
  pairs = logits.reshape(*logits.shape[:-1], -1, 2)
  return jax.random.categorical(key, filter_logits(pairs, top_k, top_p), axis=-1).astype(jnp.uint8)


@functools.partial(nnx.jit, static_argnames=("schedule", "top_k", "top_p", "guidance", "return_logits"))
def _generate(model: Infinity, key: jax.Array, text, text_lengths, labels, cfg, tau, *,
              schedule: Schedule, top_k: int, top_p: float, guidance: bool,
              return_logits: bool) -> Generation:
  condition = model.condition(text=text, text_lengths=text_lengths, labels=labels)
  batch = condition.cond.shape[0]
  if guidance:
    null = jnp.ones((batch,), bool)
    condition = condition.concat(
        model.condition(text=text, text_lengths=text_lengths, labels=labels, drop=null))
  rows = condition.cond.shape[0]
  c = model.config
  cos, sin = (jnp.asarray(t) for t in
              infinity_blocks.rope2d_cos_sin(schedule.grids, schedule.rope_grid, c.head_dim))
  cache_shape = (rows, schedule.num_tokens, c.num_heads, c.head_dim)
  cache = [(jnp.zeros(cache_shape), jnp.zeros(cache_shape)) for _ in model.blocks]
  vae_grids = _vae_grids(model, schedule)
  latent_hw = vae_grids[-1]
  summed = None
  x = (condition.cond + model.pos_start[...])[:, None, :]
  all_bits, all_logits = [], []
  for k, (h, w) in enumerate(schedule.grids):
    hidden = _scale_step(model, condition, x, k, schedule, cache, cos, sin)
    logits = model.logits(hidden, condition) * (1 / tau[k])
    if guidance:
      logits = cfg[k] * logits[:batch] + (1 - cfg[k]) * logits[batch:]
    bits = _sample_bits(jax.random.fold_in(key, k), logits, top_k, top_p).reshape(batch, h, w, -1)
    if c.spatial_patchify:
      bits = multiscale.unpatchify(bits)
    all_bits.append(bits)
    if return_logits:
      all_logits.append(logits.reshape(batch, -1, 2))
    codes = multiscale.bilinear_resize(multiscale.bits_to_codes(bits), latent_hw)
    summed = codes if summed is None else summed + codes
    if k + 1 < schedule.num_scales:
      nxt = multiscale.bilinear_resize(summed, vae_grids[k + 1])
      if c.spatial_patchify:
        nxt = multiscale.patchify(nxt)
      x = model.word_embed(nxt.reshape(batch, -1, nxt.shape[-1]))
      if guidance:
        x = jnp.concatenate([x, x], axis=0)
  return Generation(bits=tuple(all_bits), latent=summed, logits=tuple(all_logits))


def generate(model: Infinity, schedule: Schedule, key: jax.Array, *, text: jax.Array | None = None,
             text_lengths: jax.Array | None = None, labels: jax.Array | None = None,
             cfg: float | Sequence[float] | None = 3.0, tau: float | Sequence[float] = 1.0,
             top_k: int = 0, top_p: float = 0.0, return_logits: bool = False) -> Generation:
  """Samples one image's bits per caption (or label). cfg=None disables guidance (no doubled batch)."""
  if not isinstance(schedule, Schedule):
    raise TypeError(f"schedule must be an infinity_schedules.Schedule, got {type(schedule).__name__}")
  if top_k < 0 or not 0.0 <= top_p < 1.0:
    raise ValueError(f"top_k must be >= 0 and top_p in [0, 1), got top_k={top_k}, top_p={top_p}")
  if model.config.spatial_patchify and schedule.grids[0] != (1, 1):
    raise ValueError("spatial patchify needs a schedule starting at 1x1")
  model.check_condition(text=text, text_lengths=text_lengths, labels=labels)
  num_scales = schedule.num_scales
  guidance = cfg is not None
  cfg = _per_scale(1.0 if cfg is None else cfg, num_scales, "cfg")
  tau = _per_scale(tau, num_scales, "tau")
  return _generate(model, key, text, text_lengths, labels, cfg, tau, schedule=schedule, top_k=int(top_k),
                   top_p=float(top_p), guidance=guidance, return_logits=return_logits)
