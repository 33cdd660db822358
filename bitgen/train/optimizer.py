"""AdamW with linear warm-up and cosine decay, as the official BSQ-ViT trainer.

Official (`configs/tokenizer/imagenet_*_bsqvit_*.yaml`, `transcoder/optim/schedulers.py`
`LambdaWarmUpCosineScheduler`): torch AdamW, betas (0.9, 0.99), eps 1e-8, weight decay 1e-4 on every
parameter (`zero_wd_keys` empty); the learning rate is `lr * m(step)` with the multiplier m rising
linearly from `lr_start`=0.1 to 1.0 over `warm_up_steps`, then following a cosine from 1.0 down to
`lr_min`=0.5 at `max_decay_steps` and staying there. The peak `lr` is `base_lr` (4e-7) times the
global batch size. The official trainer does not clip gradients (`grad_clip_norm` None here); the
option exists for other tasks.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

DEFAULTS = dict(
    lr=1e-4, warmup_steps=0, decay_steps=None, lr_start_factor=0.1, lr_end_factor=0.5,
    b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, no_decay=(), grad_clip_norm=None)


def _get(train_config: Mapping[str, Any], key: str):
  value = train_config.get(key)
  return DEFAULTS[key] if value is None else value


def learning_rate_schedule(train_config: Mapping[str, Any]) -> optax.Schedule:
  """lr * multiplier(step): linear warm-up from lr*lr_start_factor, cosine to lr*lr_end_factor.

  The cosine spans steps [warmup_steps, decay_steps] (`decay_steps` defaults to `steps`).
  """
  peak = float(_get(train_config, "lr"))
  warmup = int(_get(train_config, "warmup_steps"))
  decay = train_config.get("decay_steps") or train_config.get("steps")
  if decay is None:
    raise ValueError("train config needs `decay_steps` or `steps` for the cosine schedule")
  if warmup < 0 or int(decay) <= warmup:
    raise ValueError(f"train config: need 0 <= warmup_steps ({warmup}) < decay_steps ({decay})")
  return optax.warmup_cosine_decay_schedule(
      init_value=peak * float(_get(train_config, "lr_start_factor")), peak_value=peak,
      warmup_steps=warmup, decay_steps=int(decay),
      end_value=peak * float(_get(train_config, "lr_end_factor")))


def _decay_mask(no_decay: Sequence[str]):
  """True where weight decay applies: parameters whose path contains none of `no_decay`."""

  def mask(params):
    def keep(path, _):
      name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
      return not any(pattern in name for pattern in no_decay)
    return jax.tree_util.tree_map_with_path(keep, params)

  return mask


def make_optimizer(train_config: Mapping[str, Any]) -> optax.GradientTransformation:
  """The optimizer for `config.train`: [clip by global norm] -> AdamW(schedule)."""
  unknown = set(train_config) & {"beta1", "beta2", "betas", "clip", "wd"}
  if unknown:
    raise ValueError(f"train config keys {sorted(unknown)} unknown; use b1, b2, grad_clip_norm, "
                     "weight_decay")
  no_decay = tuple(_get(train_config, "no_decay"))
  adamw = optax.adamw(
      learning_rate_schedule(train_config), b1=float(_get(train_config, "b1")),
      b2=float(_get(train_config, "b2")), eps=float(_get(train_config, "eps")),
      weight_decay=float(_get(train_config, "weight_decay")),
      mask=_decay_mask(no_decay) if no_decay else None)
  clip = _get(train_config, "grad_clip_norm")
  return optax.chain(optax.clip_by_global_norm(float(clip)), adamw) if clip else adamw
