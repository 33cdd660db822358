"""`bitgen <command>`: thin wrappers that parse arguments, call the library, and report.

  bitgen main     [--workdir runs/main] [--set key=value ...]   the quick-start job (README)
  bitgen train    --config NAME[:ARG] --workdir DIR [--set key=value ...] [multi-process flags]
  bitgen eval     --config NAME[:ARG] --workdir DIR [--ema]      writes DIR/eval.json
  bitgen compare  --config NAME[:ARG] --workdir DIR [--quantizers bsq,lfq,fsq]
  bitgen sample   --config NAME[:ARG] --workdir DIR --out FILE.png [--num N] [--steps S] ...
  bitgen bench    NAME [args ...]                                runs bitgen.bench.NAME

A config is a module of `configs/` (`bsq_vit:tiny`) or a file (`path/to/config.py:arg`).
"""

import argparse
import importlib
import json
import pathlib
import runpy
import sys

MAIN_CONFIG = "bsq_vit:main"

# `bitgen sample`: config.task -> the module whose `sample_grid_from_config(config, workdir, out_path,
# *, num_images, steps, seed, temperature, guidance)` writes a PNG grid from a trained workdir
# (None means the config's own default).
# Tasks whose `bitgen eval` / `bitgen sample` live in their training module
# (`evaluate_from_config`, `sample_grid_from_config`); other tasks evaluate as tokenizers.
TASK_MODULES = {"bld": "bitgen.train.bld", "infinity": "bitgen.train.infinity"}


def _add_config_args(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
  parser.add_argument("--config", required=config_required, help="NAME[:ARG] or FILE.py[:ARG]")
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value (repeatable), e.g. --set train.steps=100")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (omit on TPU pods and single processes)")
  group.add_argument("--coordinator", help="host:port of process 0")
  group.add_argument("--num_processes", type=int)
  group.add_argument("--process_id", type=int)


def _load(args) -> "ml_collections.ConfigDict":
  from bitgen import configlib
  return configlib.load_config(args.config, args.overrides)


def _initialize(args) -> None:
  from bitgen import parallel
  parallel.initialize(coordinator_address=getattr(args, "coordinator", None),
                      num_processes=getattr(args, "num_processes", None),
                      process_id=getattr(args, "process_id", None))


def _write_json(path: pathlib.Path, value) -> None:
  import jax
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def cmd_train(args) -> None:
  _initialize(args)
  from bitgen import train
  config = _load(args)
  if config.get("task") == "bld":  # two stages: the autoencoder, then the prior on its bits
    from bitgen.train.bld import train_bld
    print(json.dumps(train_bld(config.ae, config.prior, args.workdir), indent=2))
    return
  result = train.run(config, args.workdir)
  if result.history:
    print(json.dumps(result.history[-1]))


def cmd_eval(args) -> None:
  _initialize(args)
  config = _load(args)
  task = config.get("task")
  if task in TASK_MODULES:
    module = importlib.import_module(TASK_MODULES[task])
    report = module.evaluate_from_config(config, args.workdir, ema=args.ema)
  else:
    from bitgen import train
    from bitgen.eval.tokenizer import evaluate_result
    report = evaluate_result(config, train.restore(config, args.workdir), ema=args.ema)
  _write_json(args.workdir / "eval.json", report)
  print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2))


def cmd_compare(args) -> None:
  from bitgen.eval import compare
  _initialize(args)
  rows = compare.compare_quantizers(_load(args), args.workdir, args.quantizers.split(","))
  print(compare.markdown_table(rows))


def cmd_main(args) -> None:
  """Trains the tiny BSQ-ViT on the embedded photos, evaluates it against the same-bit baseline."""
  from bitgen import train
  from bitgen.eval.tokenizer import evaluate_result
  args.config = args.config or MAIN_CONFIG
  config = _load(args)
  report = evaluate_result(config, train.run(config, args.workdir))
  _write_json(args.workdir / "eval.json", report)
  print(f"\nworkdir: {args.workdir}  (checkpoints/, metrics.jsonl, tensorboard/, grids/, eval.json)")
  print(f"held-out PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.3f} "
        f"({report['bits_per_token']:g} bits per token, {report['num_images']} crops)")
  print(f"baseline PSNR {report['baseline_psnr']:.2f} dB, SSIM {report['baseline_ssim']:.3f} "
        f"({report['baseline']})")


def cmd_sample(args) -> None:
  config = _load(args)
  task = config.get("task")
  if task not in TASK_MODULES:
    raise SystemExit(f"config task {task!r} has no sampler; `bitgen sample` takes a config whose task "
                     f"is one of {sorted(TASK_MODULES)}")
  module = importlib.import_module(TASK_MODULES[task])
  path = module.sample_grid_from_config(
      config, args.workdir, args.out, num_images=args.num, steps=args.steps, seed=args.seed,
      temperature=args.temperature, guidance=args.guidance)
  print(f"wrote {path}")


def cmd_bench(args) -> None:
  module = f"bitgen.bench.{args.name}"
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name == module:
      raise SystemExit(f"unknown benchmark {args.name!r} (no module {module})") from e
    raise
  sys.argv = [module, *args.rest]
  runpy.run_module(module, run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="bitgen", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("main", help="quick start: train + evaluate the tiny BSQ-ViT")
  p.add_argument("--config", default=None, help=f"default {MAIN_CONFIG}")
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/main"))
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.set_defaults(func=cmd_main)

  p = sub.add_parser("train", help="train (or resume) a config in a workdir")
  _add_config_args(p)
  _add_distributed_args(p)
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
  _add_config_args(p)
  _add_distributed_args(p)
  p.add_argument("--ema", action="store_true", help="evaluate the EMA parameters")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("compare", help="train the same tokenizer with several quantizers, tabulate")
  _add_config_args(p)
  _add_distributed_args(p)
  p.add_argument("--quantizers", default="bsq,lfq,fsq")
  p.set_defaults(func=cmd_compare)

  p = sub.add_parser("sample", help="write a PNG grid of samples from a trained workdir")
  _add_config_args(p)
  p.add_argument("--out", type=pathlib.Path, required=True, help="PNG file to write")
  p.add_argument("--num", type=int, default=16, help="number of images")
  p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion families)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
  p.set_defaults(func=cmd_sample)

  p = sub.add_parser("bench", help="run a benchmark module of bitgen.bench")
  p.add_argument("name")
  p.add_argument("rest", nargs=argparse.REMAINDER)
  p.set_defaults(func=cmd_bench)
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  args.func(args)
