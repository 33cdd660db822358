"""Config files (`get_config(arg)`, big_vision style), overrides, and typed model configs built from
them, with clear errors for bad keys."""

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
  import ml_collections

T = TypeVar("T")


def from_dict(cls: type[T], values: Mapping[str, Any], *, where: str = "config") -> T:
  """Builds dataclass `cls` from `values`, naming any unknown or missing key."""
  if not dataclasses.is_dataclass(cls):
    raise TypeError(f"{cls!r} is not a dataclass")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  values = dict(values)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
        f"unknown key(s) {unknown} in {where} for {cls.__name__}; valid keys: {sorted(fields)}")
  missing = sorted(
      name for name, f in fields.items()
      if name not in values and f.default is dataclasses.MISSING
      and f.default_factory is dataclasses.MISSING)
  if missing:
    raise ValueError(f"missing key(s) {missing} in {where} for {cls.__name__}")
  return cls(**values)


def load_config(spec: str, overrides: Sequence[str] = ()) -> "ml_collections.ConfigDict":
  """Loads `NAME[:ARG]` (a module of `configs/`) or `path/to/file.py[:ARG]` via its `get_config(arg)`.

  `overrides` are `dotted.key=value` strings; values are Python literals (strings may be bare).
  An override naming a key the config does not have is an error.
  """
  target, _, arg = spec.partition(":")
  if target.endswith(".py"):
    path = pathlib.Path(target)
    if not path.is_file():
      raise FileNotFoundError(f"config file {target} not found")
    module_spec = importlib.util.spec_from_file_location(f"bitgen_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(f"configs.{target}")
    except ModuleNotFoundError as e:
      raise ValueError(f"unknown config {target!r}: no configs/{target}.py") from e
  config = module.get_config(arg) if arg else module.get_config()
  for override in overrides:
    apply_override(config, override)
  return config


def apply_override(config: "ml_collections.ConfigDict", override: str) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top  (models import this module; keep them free of it)

  key, sep, text = override.partition("=")
  if not sep:
    raise ValueError(f"override {override!r} must look like key=value")
  *parents, leaf = key.strip().split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r} in override {override!r}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"unknown config key {key.strip()!r} in override {override!r}")
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    value = text.strip()
  with node.unlocked() if isinstance(node, ml_collections.ConfigDict) else contextlib.nullcontext():
    node[leaf] = value
