"""The training config layout, its defaults, and validation with errors naming bad keys.

```
config.task        "tokenizer" (the family's task; see bitgen.train.tasks)
config.model       the model's own config (for the tokenizer: configs/bsq_vit.py)
config.data        passed to bitgen.data.make_pipeline(config.data, split=, batch_size=, seed=)
config.train       batch_size (global), steps, seed,
                   lr (peak), warmup_steps, decay_steps (default: steps), lr_start_factor,
                   lr_end_factor, b1, b2, eps, weight_decay, no_decay, grad_clip_norm  (optimizer.py)
                   ema_decay (None: no EMA), loss {...} (the task's loss options, tokenizer.py;
                   the GAN keys below)
config.mesh        shape (data, fsdp, tensor; one -1 = fill), axis_types explicit|auto,
                   rules {logical name: mesh axis | tuple | None} (parallel/sharding.py),
                   devices (use the first N devices; default all)
config.checkpoint  every (steps), keep (newest kept), async_save
config.log         every (steps between metric writes), grid_every (steps between PNG grids; 0 off),
                   grid_images, progress (tqdm bar)
```
Defaults follow the official BSQ-ViT recipe where it has one (optimizer.py, tokenizer.py).

The GAN term (`GAN_DEFAULTS`, keys of `config.train.loss`; off while gan_weight is 0; see
`bitgen.train.gan` and `bitgen.models.stylegan_discriminator`):
```
gan_weight            weight of the generator's adversarial loss (official disc_weight 0.1)
gan_start             first step with the GAN term and discriminator updates (official disc_start)
gan_loss              "vanilla" (non-saturating, the official yaml) | "hinge"
gan_adaptive_layer    None: fixed gan_weight (official use_adaptive_disc_weight False); a parameter
                      path ("decoder/to_pixels/kernel"): VQGAN's adaptive weight at that layer
gan_r1_gamma          R1 penalty weight gamma (0: off; the official one changes no gradient)
gan_r1_every          apply R1 every N steps, scaled by N (lazy regularisation, official 16)
gan_channel_base      StyleGAN discriminator channels: min(base // resolution, max)
gan_channel_max
gan_mbstd_group_size  minibatch-stddev group size (official 4)
```
The discriminator trains with the model's optimizer settings and learning-rate schedule (official:
both optimizers are built from the same config and stepped at the same lr).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from bitgen.parallel.sharding import DEFAULT_RULES
from bitgen.train import optimizer

GAN_DEFAULTS = dict(
    gan_weight=0.0, gan_start=0, gan_loss="vanilla", gan_adaptive_layer=None, gan_r1_gamma=0.0,
    gan_r1_every=16, gan_channel_base=32768, gan_channel_max=512, gan_mbstd_group_size=4)
TRAIN_DEFAULTS = dict(
    batch_size=8, steps=1000, seed=0, ema_decay=0.999, loss={},
    **{k: v for k, v in optimizer.DEFAULTS.items()})
MESH_DEFAULTS = dict(shape=(1, -1, 1), axis_types="explicit", rules=DEFAULT_RULES, devices=None)
CHECKPOINT_DEFAULTS = dict(every=1000, keep=3, async_save=True)
LOG_DEFAULTS = dict(every=50, grid_every=500, grid_images=8, progress=True)
SECTIONS = {"train": TRAIN_DEFAULTS, "mesh": MESH_DEFAULTS, "checkpoint": CHECKPOINT_DEFAULTS,
            "log": LOG_DEFAULTS}


def _section(config, name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  given = config.get(name) if hasattr(config, "get") else None
  given = dict(given or {})
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in config.{name}; valid keys: {sorted(defaults)}")
  return {**defaults, **given}


def with_defaults(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with every training section complete; unknown keys raise."""
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  out = ml_collections.ConfigDict(as_dict, type_safe=False)
  for name, defaults in SECTIONS.items():
    section = _section(config, name, defaults)
    out[name] = ml_collections.ConfigDict(section, type_safe=False)
  if "task" not in out:
    out.task = "tokenizer"
  train = out.train
  if train.batch_size <= 0 or train.steps <= 0:
    raise ValueError(f"config.train.batch_size ({train.batch_size}) and steps ({train.steps}) "
                     "must be positive")
  return out

