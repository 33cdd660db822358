"""Typed model configs built from `ml_collections` dicts, with clear errors for bad keys."""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

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
