"""The Infinity transformer task: teacher forcing with bitwise self-correction on a frozen VAE.

Official `trainer.py::InfinityTrainer.train_step` (`use_bit_label=1`, `bitloss_type='mean'`,
`reweight_loss_by_scale=1`): images -> frozen VAE features -> `flip_requant` with flip strengths
drawn per scale from {0, .01, ..., max_strength} (inputs and later labels follow the corrupted
path; each scale's label is its clean bits) -> transformer logits -> per-bit cross-entropy, mean
over bits, scale-reweighted sum over tokens, mean over the batch. Captions (here: class labels,
which enter through the text path) are replaced by the null condition with probability
`cond_drop_rate` (classifier-free guidance). The schedule is the official prefix reaching the
latent grid of the batch's images (`infinity_schedules.schedule_for_latent`), optionally cut to
the first `num_train_scales` scales (official `always_training_scales`).

Use with the generic trainer: `trainer.run(config, workdir, task=InfinityTask(...))`, with a
trained VAE (`bitgen.convert.infinity.load_vae` or a stage-1 tokenizer checkpoint).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.models import infinity_loss
from bitgen.models import infinity_schedules
from bitgen.models.infinity import Infinity, InfinityConfig, check_vae_compatible
from bitgen.models.infinity_loss import InfinityLossConfig
from bitgen.quantizers import bitwise_self_correction as bsc


class InfinityTask:
  """Trains `Infinity(model_config)` on batches {"image": [B, H, W, 3] in [-1, 1], "label": [B]}."""

  def __init__(self, model_config: InfinityConfig, vae: nnx.Module,
               loss: Mapping[str, Any] | InfinityLossConfig | None = None):
    check_vae_compatible(vae.num_bits, model_config)
    if not model_config.num_classes:
      raise ValueError("InfinityTask trains class-conditional models (labels through the text "
                       "path); set model num_classes > 0")
    self.model_config = model_config
    self.loss_config = (loss if isinstance(loss, InfinityLossConfig)
                        else InfinityLossConfig(**(loss or {})))
    # Host copies: the VAE enters the (sharded) train step as constants, never with the mesh types
    # of the run that trained it.
    self.vae_graphdef, state = nnx.split(vae)
    self.vae_state = jax.device_get(state)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return Infinity(self.model_config, rngs=rngs)

  @property
  def vae(self) -> nnx.Module:
    """The frozen VAE (its arrays enter traced functions as constants, never as trained params)."""
    return nnx.merge(self.vae_graphdef, self.vae_state)

  def schedules(self, image_shape: tuple[int, ...]) -> tuple[infinity_schedules.Schedule, tuple]:
    """(transformer schedule, VAE grids) for images of this shape."""
    return infinity_loss.training_schedules(self.vae, self.model_config, image_shape)

  def targets(self, images: jax.Array, rng: jax.Array
              ) -> tuple[infinity_schedules.Schedule, jax.Array, jax.Array]:
    """(training schedule, inputs (B, L - 1, d), labels (B, L, d)) with self-correction noise."""
    return infinity_loss.training_targets(self.vae, self.model_config, self.loss_config, images, rng)

  def loss(self, model, batch, *, step, rng):
    del step
    return infinity_loss.training_loss(model, self.vae, self.loss_config, batch["image"], rng,
                                       labels=batch["label"])

  def visualize(self, model, batch):
    """Samples for the batch's labels (CFG 3, tau 1) next to the inputs."""
    from bitgen.sample import next_scale  # pylint: disable=g-import-not-at-top
    images = batch["image"]
    schedule, _ = self.schedules(images.shape)
    generation = next_scale.generate(model, schedule, jax.random.key(0), labels=batch["label"],
                                     cfg=3.0)
    return {"inputs": images, "outputs": self.vae.decode(generation.latent)}


def build_task(config) -> Any:
  """The task of an Infinity training config (`configs/infinity.py`), by `config.task`:

  - "infinity_vae": the VAE as an image tokenizer (`TokenizerTask`: L1 + multi-scale quantizer
    loss, optional LPIPS); `config.model` is an `InfinityVAEConfig` dict.
  - "infinity": the transformer on a frozen VAE; `config.model` is an `InfinityConfig` dict,
    and the VAE comes from `config.vae_source` (see `load_vae`).
  """
  from bitgen import configlib  # pylint: disable=g-import-not-at-top
  from bitgen.models.infinity_vae import InfinityVAE, InfinityVAEConfig  # pylint: disable=g-import-not-at-top
  if config.task == "infinity_vae":
    from bitgen.train.tokenizer import TokenizerTask  # pylint: disable=g-import-not-at-top
    vae_config = configlib.from_dict(InfinityVAEConfig, config.model, where="config.model")
    return TokenizerTask(loss=config.train.get("loss"),
                         model_fn=lambda rngs: InfinityVAE(vae_config, rngs=rngs))
  if config.task == "infinity":
    model_config = configlib.from_dict(InfinityConfig, config.model, where="config.model")
    return InfinityTask(model_config, load_vae(config), loss=config.train.get("loss"))
  raise ValueError(f"unknown Infinity task {config.task!r}; expected 'infinity_vae' or 'infinity'")


def load_vae(config) -> nnx.Module:
  """The frozen VAE of a transformer config.

  `config.vae_source` is the workdir of a finished VAE run whose complete config is
  `config.vae_stage` (the EMA weights when that run kept an EMA), or an official checkpoint file
  read with `config.vae` (an `InfinityVAEConfig` dict).
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  source = pathlib.Path(config.vae_source)
  if source.is_dir():
    from bitgen.train import config as config_lib  # pylint: disable=g-import-not-at-top
    from bitgen.train import trainer  # pylint: disable=g-import-not-at-top
    stage1 = config_lib.with_defaults(config.vae_stage)
    return trainer.restore(stage1, source, task=build_task(stage1)).model(ema=True)
  from bitgen import configlib  # pylint: disable=g-import-not-at-top
  from bitgen.convert import infinity as convert  # pylint: disable=g-import-not-at-top
  from bitgen.models.infinity_vae import InfinityVAEConfig  # pylint: disable=g-import-not-at-top
  return convert.load_vae(source, configlib.from_dict(InfinityVAEConfig, config.vae, where="config.vae"))


def evaluate_bits(task: InfinityTask, model: nnx.Module, train_batches, eval_batches, *,
                  unconditional: bool = False) -> dict[str, float]:
  """Held-out bits-per-bit NLL of the model (clean teacher forcing, conditioned on the batches'
  labels, or on the null condition when `unconditional`) against the unconditional bit-frequency
  baseline fitted on the training batches' labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  def clean_targets(images):
    schedule, vae_grids = task.schedules(images.shape)
    inputs, labels = bsc.flip_requant(task.vae.encode_features(images), vae_grids)
    return schedule, inputs, labels

  @jax.jit
  def clean_labels(images):
    return clean_targets(images)[2]

  @nnx.jit
  def nll_bits(model, images, classes):
    schedule, inputs, labels = clean_targets(images)
    drop = jnp.full(classes.shape, unconditional)
    logits = model(inputs, schedule, labels=classes, drop=drop)
    return jnp.sum(infinity_loss.bitwise_cross_entropy(logits, labels)) / jnp.log(2.0), labels

  if task.model_config.spatial_patchify:
    raise NotImplementedError("evaluate_bits does not patchify labels yet")
  train_labels = np.concatenate([np.asarray(clean_labels(jnp.asarray(b["image"]))) for b in train_batches])
  schedule = None
  total, count, eval_labels = 0.0, 0, []
  for b in eval_batches:
    images = jnp.asarray(b["image"])
    schedule = schedule or task.schedules(images.shape)[0]
    bits, labels = nll_bits(model, images, jnp.asarray(b["label"]))
    total += float(bits)
    count += labels.size
    eval_labels.append(np.asarray(labels))
  frequencies = infinity_loss.fit_bit_frequencies(train_labels, schedule)
  baseline = infinity_loss.baseline_bits_per_bit(frequencies, np.concatenate(eval_labels), schedule)
  return {"bits_per_bit": total / count, "baseline_bits_per_bit": baseline}


def evaluate_config(config, model: nnx.Module, task: InfinityTask | None = None, *,
                    batch_size: int = 64, train_batches: int = 4) -> dict[str, Any]:
  """`evaluate_bits` of a trained `train_tiny`-style config on its data, as a report.

  Baseline: bit frequencies of `train_batches` batches of the training stream. Held out: the eval
  split's crops (photos never seen in training, whose photo-id classes were never trained either,
  so the headline NLL there is the unconditional one: the null condition of CFG dropout). Also:
  fresh crops of the training photos (another stream seed), conditional on their photo id and not.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bitgen import data  # pylint: disable=g-import-not-at-top
  from bitgen.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  task = task or build_task(config)

  def stream(seed):
    it = iter(data.make_pipeline(config.data, split="train", batch_size=batch_size, seed=seed))
    return [next(it) for _ in range(train_batches)]

  def chunks(images, labels):
    return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
            for i in range(0, len(images), batch_size)]

  train = stream(config.train.seed)
  held_out = data.eval_images(config.data)
  held = chunks(held_out["image"], held_out["label"])
  fresh = stream(config.train.seed + 1)
  held_uncond = evaluate_bits(task, model, train, held, unconditional=True)
  fresh_cond = evaluate_bits(task, model, train, fresh)
  fresh_uncond = evaluate_bits(task, model, train, fresh, unconditional=True)
  return {
      "held_out": {"crops": int(len(held_out["image"])),
                   "photos": sorted(set(held_out["name"])),
                   "bits_per_bit_unconditional": held_uncond["bits_per_bit"],
                   "baseline_bits_per_bit": held_uncond["baseline_bits_per_bit"]},
      "train_photos_fresh_crops": {"crops": int(sum(len(b["image"]) for b in fresh)),
                                   "bits_per_bit_conditional": fresh_cond["bits_per_bit"],
                                   "bits_per_bit_unconditional": fresh_uncond["bits_per_bit"],
                                   "baseline_bits_per_bit": fresh_cond["baseline_bits_per_bit"]},
      "baseline_train_crops": int(np.sum([len(b["image"]) for b in train])),
  }


def train_and_evaluate(config_vae, config, workdir, *, eval_batch_size: int = 64) -> dict[str, Any]:
  """Trains the VAE (`<workdir>/vae`), then the transformer on it (`<workdir>/transformer`),
  evaluates the transformer (`evaluate_config`) and writes `<workdir>/report.json`; returns it.

  Reproduces bitgen/bench/RESULTS_infinity.md (section "Training"):
      train_and_evaluate(get_config("train_tiny_vae"), get_config("train_tiny"), "workdirs/infinity")
  """
  import datetime  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from bitgen.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from bitgen.train import trainer  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  config = config_lib.with_defaults(config)
  config.vae_stage = config_lib.with_defaults(config_vae)
  config.vae_source = str(workdir / "vae")
  start = time.perf_counter()
  vae_result = trainer.run(config.vae_stage, workdir / "vae", task=build_task(config.vae_stage))
  vae_minutes = (time.perf_counter() - start) / 60
  start = time.perf_counter()
  task = build_task(config)
  result = trainer.run(config, workdir / "transformer", task=task)
  minutes = (time.perf_counter() - start) / 60
  start = time.perf_counter()
  report = {
      "date": datetime.date.today().isoformat(),
      "jax": jax.__version__,
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "vae": {"steps": int(vae_result.state.step), "train_minutes": vae_minutes,
              "final_metrics": vae_result.history[-1] if vae_result.history else {}},
      "transformer": {"steps": int(result.state.step), "train_minutes": minutes,
                      "final_metrics": result.history[-1] if result.history else {},
                      **evaluate_config(config, result.model(), task, batch_size=eval_batch_size)},
  }
  report["eval_minutes"] = (time.perf_counter() - start) / 60
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  return report


def restore_model(config, workdir, *, ema: bool = False) -> tuple[nnx.Module, InfinityTask]:
  """(the transformer of `config` (its EMA parameters if `ema`) from the latest checkpoint in
  `<workdir>/checkpoints`, on this process's first device; its task, which holds the frozen VAE
  read from `config.vae_source`)."""
  from bitgen.train import bld  # pylint: disable=g-import-not-at-top
  from bitgen.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from bitgen.train import trainer  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(config)
  if config.task != "infinity":
    raise ValueError(f"restore_model takes an Infinity transformer config (task 'infinity'), got "
                     f"task {config.task!r}")
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  if not checkpoints.is_dir():  # before loading the VAE and building the state
    raise FileNotFoundError(f"no checkpoint in {checkpoints}: train first (bitgen train --workdir "
                            f"{workdir})")
  task = build_task(config)
  return bld.on_one_device(trainer.restore(config, workdir, task=task).model(ema=ema)), task


def evaluate_from_config(config, workdir, *, ema: bool = False) -> dict[str, Any]:
  """`bitgen eval` for task "infinity": `evaluate_config` of the transformer trained in `workdir`."""
  model, task = restore_model(config, workdir, ema=ema)
  return evaluate_config(config, model, task)


SAMPLE_DEFAULTS = dict(cfg=3.0, tau=1.0, top_k=0, top_p=0.0, columns=8)


def sample_grid_from_config(config, workdir, out_path, *, num_images: int | None = None,
                            steps: int | None = None, seed: int | None = None,
                            temperature: float | None = None, guidance: float | None = None):
  """`bitgen sample` for task "infinity": class-conditional samples of the transformer trained in
  `workdir` (its VAE from `config.vae_source`) -> one RGB PNG grid at `out_path`; returns the path.

  num_images (default 16) get labels 0, 1, 2, ... mod num_classes, one row per `columns` images;
  temperature is tau and guidance the CFG weight (defaults: `config.sample`, else SAMPLE_DEFAULTS);
  the image size is the config's data.image_size. Infinity has no step count: its scale schedule
  is fixed by the image size, so `steps` must be None.
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from bitgen.sample import bld as bld_sample  # pylint: disable=g-import-not-at-top
  from bitgen.sample import next_scale  # pylint: disable=g-import-not-at-top
  if steps is not None:
    raise ValueError(f"Infinity samples one pass over a fixed scale schedule; steps={steps} does not "
                     "apply (omit --steps)")
  num_images = 16 if num_images is None else num_images
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  options = {**SAMPLE_DEFAULTS, **dict(config.get("sample") or {})}
  unknown = sorted(set(options) - set(SAMPLE_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in config.sample; valid keys: {sorted(SAMPLE_DEFAULTS)}")
  model, task = restore_model(config, workdir)
  size = dict(config.data)["image_size"]
  schedule, _ = task.schedules((num_images, size, size, 3))
  labels = jnp.arange(num_images, dtype=jnp.int32) % model.config.num_classes
  generation = next_scale.generate(
      model, schedule, jax.random.key(0 if seed is None else seed), labels=labels,
      cfg=options["cfg"] if guidance is None else guidance,
      tau=options["tau"] if temperature is None else temperature,
      top_k=options["top_k"], top_p=options["top_p"])
  images = nnx.jit(lambda vae, latent: vae.decode(latent))(task.vae, generation.latent)  # RGB
  path = pathlib.Path(out_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(bld_sample.image_grid(images, columns=options["columns"])).save(path)
  return path
