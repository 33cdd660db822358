"""Shared test set-up: 8 host devices for sharding tests, and the parity fixtures folder."""

import os
import pathlib

import numpy as np
import pytest


def pytest_configure(config):
  """Before the first jax use: tests run on 8 CPU host devices (sharding tests build a (2, 2, 2)
  mesh), except a run that selects the `gpu` marker, where jax picks the GPU (its tests skip,
  saying so, where there is none)."""
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  markexpr = config.option.markexpr or ""
  if not ("gpu" in markexpr and "not gpu" not in markexpr):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

PARITY_DIR = pathlib.Path(
    os.environ.get("BITGEN_PARITY_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> pathlib.Path:
  return PARITY_DIR


def load_parity(name: str, filename: str) -> dict[str, np.ndarray]:
  """Loads `../shared/parity/<name>/<filename>`, skipping the test where the fixtures are absent."""
  path = PARITY_DIR / name / filename
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found (set BITGEN_PARITY_DIR to the shared/parity folder)")
  with np.load(path) as data:
    return dict(data)
