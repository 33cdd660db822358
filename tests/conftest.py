"""Shared test set-up: 8 host devices for sharding tests, and the parity fixtures folder."""

import os
import pathlib

# Must precede the first jax import: sharding tests build a (2, 2, 2) mesh on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

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
