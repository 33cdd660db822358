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
`generate` is compiled once per (model graph, schedule, batch, top_k, top_p, cfg on/off, dtype); cfg
and tau values are traced (changing them does not retrace); randomness comes only from `key`.
Images: `vae.decode(output.latent)` (RGB, [-1, 1]).

Speed: the program scans over the blocks (stacked once by `prepare`, which can also cast them to
bfloat16), so it holds one block per scale; the KV cache [depth, 2B, T - n_last, N, H] is allocated
once inside the program and updated in place (the last scale's keys are never cached: no later
scale reads them); on GPU in 16-bit the self-attention is cuDNN flash attention.
"""

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.models.infinity import Condition, Infinity, InfinityConfig
from bitgen.models.infinity_schedules import Schedule
from bitgen.nn import attention as attention_lib
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


def _vae_grids(config: InfinityConfig, schedule: Schedule) -> tuple[tuple[int, int], ...]:
  factor = 2 if config.spatial_patchify else 1
  return tuple((h * factor, w * factor) for h, w in schedule.grids)


@flax.struct.dataclass
class SamplingModel:
  """An `Infinity` split for sampling: `head` is everything but the blocks, `blocks` the blocks'
  variables stacked on a leading depth axis (scanned over, so a program holds one block per scale)."""

  head_def: nnx.GraphDef = flax.struct.field(pytree_node=False)
  head: nnx.State
  block_def: nnx.GraphDef = flax.struct.field(pytree_node=False)
  blocks: nnx.State

  @property
  def dtype(self):
    """The activation dtype: the dtype of the parameters."""
    return jax.tree.leaves(self.blocks)[0].dtype


def prepare(model: Infinity, dtype=None) -> SamplingModel:
  """Stacks the blocks of `model` (optionally casting every floating variable to `dtype`, e.g.
  bfloat16 for fast inference). Keep the result and drop the model to hold the weights once."""
  head = nnx.merge(*nnx.split(model))  # a copy of the module tree sharing the arrays
  blocks = list(head.blocks)
  head.blocks = nnx.List([])
  block_def = nnx.split(blocks[0])[0]
  head_def, head_state = nnx.split(head)

  def cast(a):
    return a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a

  stacked = jax.tree.map(lambda *xs: jnp.stack([cast(x) for x in xs]),
                         *[nnx.split(b)[1] for b in blocks])
  return SamplingModel(head_def=head_def, head=jax.tree.map(cast, head_state), block_def=block_def,
                       blocks=stacked)


def default_attention(dtype) -> str | None:
  """cuDNN flash attention on GPU in 16-bit (the KV-cached attention at 1024^2 would otherwise
  materialise [rows, heads, 4096, 10521] float32 scores); `bitgen.nn.attention` elsewhere."""
  return "cudnn" if attention_lib.cudnn_applies(dtype) else None


def _scale_step(head: Infinity, weights: SamplingModel, condition: Condition, x: jax.Array, k: int,
                schedule: Schedule, cache: tuple[jax.Array, jax.Array], cos: jax.Array,
                sin: jax.Array, implementation: str | None) -> tuple[jax.Array, tuple]:
  """Runs the tokens [R, n_k, C] of scale k through every block (a scan over the stacked blocks).

  cache: keys and values [depth, R, T_cache, N, H] of every scale but the last (whose keys no
  later scale reads), updated in place for scales that fit in it. The last scale assembles each
  block's keys and values in one [R, T, N, H] buffer per K and V, reused by every block (a
  concatenation of the cached prefix and the new keys ran at a third of memory bandwidth).
  """
  start = schedule.offsets[k]
  end = start + schedule.tokens_per_scale[k]
  cos_k, sin_k = cos[start:end], sin[start:end]
  rows, cached = x.shape[0], end <= cache[0].shape[2]
  x = x + head.lvl_embed(jnp.full((x.shape[1],), k, jnp.int32))[None].astype(x.dtype)

  def layer(carry, variables):
    x, keys, values, assembled, i = carry
    block = nnx.merge(weights.block_def, variables)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = block.modulation(condition.shared_gss)
    x_sa = infinity_blocks.plain_layer_norm(x, block.norm_eps) * (scale1 + 1) + shift1
    q, key, value = block.sa.qkv(x_sa, cos_k, sin_k)
    heads = key.shape[2:]

    def prefix(cache, length):  # [R, length, N, H] of block i
      return jax.lax.dynamic_slice(cache, (i, 0, 0, 0, 0), (1, rows, length, *heads))[0]

    if cached:
      keys = jax.lax.dynamic_update_slice(keys, key[None], (i, 0, start, 0, 0))
      values = jax.lax.dynamic_update_slice(values, value[None], (i, 0, start, 0, 0))
      layer_keys, layer_values = prefix(keys, end), prefix(values, end)
    else:  # the last scale: the cached prefix, then its own keys
      layer_keys, layer_values = assembled = tuple(
          jax.lax.dynamic_update_slice(jax.lax.dynamic_update_slice(buffer, prefix(cache, start), (0,) * 4),
                                       new, (0, start, 0, 0))
          for buffer, cache, new in zip(assembled, (keys, values), (key, value)))
    attended = block.sa.attend(q, layer_keys, layer_values, None, implementation=implementation)
    x = x + attended * gamma1
    x = block.cross_and_ffn(x, gamma2, scale2, shift2, condition.text, condition.text_lengths)
    return (x.astype(carry[0].dtype), keys, values, assembled, i + 1), None

  c = head.config
  assembled = () if cached else tuple(
      jnp.zeros((rows, end, c.num_heads, c.head_dim), cache[0].dtype) for _ in range(2))
  (x, keys, values, _, _), _ = jax.lax.scan(layer, (x, *cache, assembled, jnp.int32(0)), weights.blocks)
  return x, (keys, values)


def _sample_bits(key: jax.Array, logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """(B, n, 2d) -> (B, n, d) uint8 bits drawn per bit."""
  pairs = logits.reshape(*logits.shape[:-1], -1, 2)
  return jax.random.categorical(key, filter_logits(pairs, top_k, top_p), axis=-1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("schedule", "top_k", "top_p", "guidance", "return_logits",
                                             "implementation"))
def _generate(weights: SamplingModel, key: jax.Array, text, text_lengths, labels, cfg, tau, *,
              schedule: Schedule, top_k: int, top_p: float, guidance: bool, return_logits: bool,
              implementation: str | None) -> Generation:
  head = nnx.merge(weights.head_def, weights.head)
  dtype = weights.dtype
  condition = head.condition(text=text, text_lengths=text_lengths, labels=labels)
  batch = condition.cond.shape[0]
  if guidance:
    null = jnp.ones((batch,), bool)
    condition = condition.concat(
        head.condition(text=text, text_lengths=text_lengths, labels=labels, drop=null))
  rows = condition.cond.shape[0]
  c = head.config
  cos, sin = (jnp.asarray(t) for t in
              infinity_blocks.rope2d_cos_sin(schedule.grids, schedule.rope_grid, c.head_dim))
  cache_shape = (c.depth, rows, schedule.offsets[-1], c.num_heads, c.head_dim)
  cache = (jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))
  vae_grids = _vae_grids(c, schedule)
  latent_hw = vae_grids[-1]
  summed = None
  x = (condition.cond + head.pos_start[...])[:, None, :]
  all_bits, all_logits = [], []
  for k, (h, w) in enumerate(schedule.grids):
    hidden, cache = _scale_step(head, weights, condition, x, k, schedule, cache, cos, sin,
                                implementation)
    logits = head.logits(hidden, condition).astype(jnp.float32) * (1 / tau[k])
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
      x = head.word_embed(nxt.reshape(batch, -1, nxt.shape[-1]).astype(dtype))
      if guidance:
        x = jnp.concatenate([x, x], axis=0)
  return Generation(bits=tuple(all_bits), latent=summed, logits=tuple(all_logits))


def generate(model: Infinity | SamplingModel, schedule: Schedule, key: jax.Array, *,
             text: jax.Array | None = None, text_lengths: jax.Array | None = None,
             labels: jax.Array | None = None, cfg: float | Sequence[float] | None = 3.0,
             tau: float | Sequence[float] = 1.0, top_k: int = 0, top_p: float = 0.0,
             return_logits: bool = False, attention_impl: str | None = "auto") -> Generation:
  """Samples one image's bits per caption (or label). cfg=None disables guidance (no doubled batch).

  model: an `Infinity` (stacked for every call), or `prepare(model, dtype)` made once (what fast
  repeated sampling wants; bfloat16 there computes in bfloat16). attention_impl: "auto"
  (`default_attention`), None (`bitgen.nn.attention`), "xla" or "cudnn".
  """
  if not isinstance(schedule, Schedule):
    raise TypeError(f"schedule must be an infinity_schedules.Schedule, got {type(schedule).__name__}")
  if top_k < 0 or not 0.0 <= top_p < 1.0:
    raise ValueError(f"top_k must be >= 0 and top_p in [0, 1), got top_k={top_k}, top_p={top_p}")
  if not isinstance(model, (Infinity, SamplingModel)):
    raise TypeError(f"model must be an Infinity or a next_scale.prepare(...) of one, got "
                    f"{type(model).__name__}")
  weights = model if isinstance(model, SamplingModel) else prepare(model)
  head = nnx.merge(weights.head_def, weights.head)
  if head.config.spatial_patchify and schedule.grids[0] != (1, 1):
    raise ValueError("spatial patchify needs a schedule starting at 1x1")
  head.check_condition(text=text, text_lengths=text_lengths, labels=labels)
  if attention_impl == "auto":
    attention_impl = default_attention(weights.dtype)
  if attention_impl not in (None, "xla", "cudnn"):
    raise ValueError(f"attention_impl must be 'auto', None, 'xla' or 'cudnn', got {attention_impl!r}")
  num_scales = schedule.num_scales
  guidance = cfg is not None
  cfg = _per_scale(1.0 if cfg is None else cfg, num_scales, "cfg")
  tau = _per_scale(tau, num_scales, "tau")
  return _generate(weights, key, text, text_lengths, labels, cfg, tau, schedule=schedule,
                   top_k=int(top_k), top_p=float(top_p), guidance=guidance,
                   return_logits=return_logits, implementation=attention_impl)
