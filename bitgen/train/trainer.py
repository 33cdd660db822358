"""The generic training loop and `run(config, workdir)`, the entry point the CLI calls.

`run` builds the mesh, the task's model on its shardings, the optimizer and the data pipeline,
resumes from the latest checkpoint in `<workdir>/checkpoints` if there is one, trains to
`config.train.steps` (with a task's auxiliary module, such as a GAN discriminator, trained beside the
model by an optimizer of the same settings), and writes metrics (`metrics.jsonl`, `tensorboard/`), reconstruction grids
(`grids/step_XXXXXXX.png`) and checkpoints. The config layout is documented in
`bitgen.train.config`. Importing this module has no side effects.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import importlib
import json
import pathlib
import time
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from bitgen import parallel
from bitgen.train import config as config_lib
from bitgen.train.checkpoint import Checkpointer
from bitgen.train.metrics import MetricsWriter, save_grid
from bitgen.train.optimizer import learning_rate_schedule, make_optimizer
from bitgen.train.state import TrainState, abstract_graphdef, create_train_state
from bitgen.train.step import jit_train_step
from bitgen.train.task import Task, auxiliary_of


@dataclasses.dataclass
class TrainResult:
  state: TrainState                 # the final (sharded) training state
  graphdef: nnx.GraphDef            # nnx.merge(graphdef, state.params, state.extra) is the model
  history: list[dict[str, float]]   # the logged metrics, one dict per log step ({"step": ...})
  workdir: pathlib.Path
  aux_graphdef: nnx.GraphDef | None = None  # the task's auxiliary module (state.aux_params), if any

  def model(self, ema: bool = False) -> nnx.Module:
    """The trained model (with the EMA parameters when `ema` and EMA is on), still sharded, on
    Auto mesh axes so that it can be called like any module (eagerly or in a user's jit)."""
    params = self.state.ema_params if ema and self.state.ema_params else self.state.params
    return nnx.merge(self.graphdef, *parallel.to_auto_axes((params, self.state.extra)))


# config.task -> the module whose `build_task(config)` builds that family's task.
FAMILY_TASKS = {
    "bld_autoencoder": "bitgen.train.bld",
    "bld_prior": "bitgen.train.bld",
    "infinity_vae": "bitgen.train.infinity",
    "infinity": "bitgen.train.infinity",
}


def build_task(config) -> Task:
  """The task named by `config.task`: "tokenizer" (BSQ-ViT and other image tokenizers) or a
  model family's task (`FAMILY_TASKS`)."""
  if config.task == "tokenizer":
    from bitgen.train.tokenizer import TokenizerTask  # pylint: disable=g-import-not-at-top
    return TokenizerTask(config.model, loss=config.train.loss)
  if config.task in FAMILY_TASKS:
    return importlib.import_module(FAMILY_TASKS[config.task]).build_task(config)
  raise ValueError(f"unknown task {config.task!r}; expected one of "
                   f"{sorted(['tokenizer', *FAMILY_TASKS])}")


def _train_iterator(config, batch_size: int):
  """This process's iterator over the training batches; `batch_size` is global."""
  from bitgen import data  # pylint: disable=g-import-not-at-top
  pipeline = data.make_pipeline(config.data, split="train", batch_size=batch_size,
                                seed=config.train.seed)
  return pipeline if hasattr(pipeline, "__next__") else iter(pipeline)


def _jit_visualize(task: Task, graphdef, mesh, count: int):
  """(params, extra, batch) -> the task's grid images for the first `count` examples, replicated."""

  def visualize(params, extra, batch):
    model = nnx.merge(graphdef, params, extra)
    return task.visualize(model, {k: v[:count] for k, v in batch.items()})

  visualize = parallel.under_auto_axes(visualize, mesh, P())
  return jax.jit(visualize, out_shardings=parallel.replicated(mesh))


class _Setup:
  """What training and restoring share: the config with defaults, mesh, task, sharded state."""

  def __init__(self, config: Mapping[str, Any], workdir: str | pathlib.Path, task: Task | None):
    parallel.initialize()
    self.config = config = config_lib.with_defaults(config)
    train = config.train
    self.mesh = parallel.make_mesh(config.mesh)
    self.rules = parallel.rules_from_config(config.mesh.rules)
    divisor = parallel.batch_divisor(self.mesh, self.rules)
    if train.batch_size % divisor:
      raise ValueError(f"config.train.batch_size {train.batch_size} is not divisible by the "
                       f"{divisor} batch shards of mesh {dict(self.mesh.shape)}")
    self.task = task = task or build_task(config)
    self.tx = make_optimizer(train)
    build_auxiliary = auxiliary_of(task)
    auxiliary_fn = (lambda: build_auxiliary(nnx.Rngs(train.seed + 1))) if build_auxiliary else None
    # The official trainer builds both optimizers from one config and steps them at the same lr.
    self.aux_tx = make_optimizer(train) if auxiliary_fn else None
    self.aux_graphdef = abstract_graphdef(auxiliary_fn) if auxiliary_fn else None
    self.graphdef, self.state, self.shardings = create_train_state(
        lambda: task.build_model(nnx.Rngs(train.seed)), self.tx, mesh=self.mesh, rules=self.rules,
        seed=train.seed, use_ema=bool(train.ema_decay), auxiliary_fn=auxiliary_fn,
        auxiliary_tx=self.aux_tx)
    ckpt = config.checkpoint
    self.checkpointer = Checkpointer(
        pathlib.Path(workdir) / "checkpoints", every=ckpt.every, keep=ckpt.keep,
        async_save=ckpt.async_save,
        description={"task": config.task, "model": _jsonable(config.get("model"))})


def restore(config: Mapping[str, Any], workdir: str | pathlib.Path, *, step: int | None = None,
            task: Task | None = None) -> TrainResult:
  """The model state of `config` saved in `workdir` (the latest checkpoint, or `step`); no training."""
  setup = _Setup(config, workdir, task)
  with setup.checkpointer as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: "
                              f"train first (bitgen train --workdir {workdir})")
    state = checkpointer.restore(setup.state, step=step)
  return TrainResult(state=state, graphdef=setup.graphdef, history=[], workdir=pathlib.Path(workdir),
                     aux_graphdef=setup.aux_graphdef)


def run(config: Mapping[str, Any], workdir: str | pathlib.Path, *, task: Task | None = None,
        train_data: Iterator[Mapping[str, Any]] | None = None,
        progress_callback: Callable[[int, dict], None] | None = None) -> TrainResult:
  """Trains (or resumes) the model of `config` in `workdir`; returns the final state and history.

  task: overrides the task built from `config.task` (tests, new families).
  train_data: overrides the data pipeline: an iterator of per-process batches
    {"image": [B/processes, H, W, 3], ...}; with `get_state`/`set_state` it is checkpointed.
  """
  setup = _Setup(config, workdir, task)
  config, mesh, rules, task, graphdef, state, shardings, checkpointer = (
      setup.config, setup.mesh, setup.rules, setup.task, setup.graphdef, setup.state,
      setup.shardings, setup.checkpointer)
  train, log = config.train, config.log
  workdir = pathlib.Path(workdir)
  tx, schedule = setup.tx, learning_rate_schedule(train)
  parallel.per_process_batch_size(train.batch_size)  # checks the split over processes
  batches = train_data if train_data is not None else _train_iterator(config, train.batch_size)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state, batches)
  start = int(state.step)

  batch_sharding = parallel.batch_sharding(mesh, rules)
  step_fn = jit_train_step(graphdef, task=task, tx=tx, schedule=schedule,
                           ema_decay=train.ema_decay or None, mesh=mesh,
                           state_shardings=shardings, batch_sharding=batch_sharding,
                           aux_graphdef=setup.aux_graphdef, aux_tx=setup.aux_tx)
  visualize = _jit_visualize(task, graphdef, mesh, log.grid_images) if log.grid_every else None
  writer = MetricsWriter(workdir)
  history: list[dict[str, float]] = []
  bar = None
  if log.progress and jax.process_index() == 0:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=train.steps, initial=start, unit="step", dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), start
  try:
    with jax.set_mesh(mesh):
      for step in range(start, train.steps):
        batch = parallel.global_batch(next(batches), batch_sharding)
        state, metrics = step_fn(state, batch)
        done = step + 1
        if bar is not None:
          bar.update(1)
        if done % log.every == 0 or done == train.steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          scalars["steps_per_second"] = (done - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, done
          history.append({"step": done, **scalars})
          writer.write(done, scalars)
          if bar is not None:
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
          if progress_callback is not None:
            progress_callback(done, scalars)
        if visualize is not None and (done % log.grid_every == 0 or done == train.steps):
          images = jax.device_get(visualize(state.params, state.extra, batch))
          if jax.process_index() == 0:
            save_grid(workdir / "grids" / f"step_{done:07d}.png", images["inputs"],
                      images["outputs"])
        checkpointer.save(done, state, batches, force=done == train.steps)
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    checkpointer.close()
  return TrainResult(state=state, graphdef=graphdef, history=history, workdir=workdir,
                     aux_graphdef=setup.aux_graphdef)


def _jsonable(value):
  if value is None:
    return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if dataclasses.is_dataclass(value):
    value = dataclasses.asdict(value)
  return json.loads(json.dumps(value, default=str))
