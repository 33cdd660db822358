"""quantized_matmul's Mosaic TPU kernel compiles for real TPU generations (libtpu, on CPU)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from bitgen.kernels.quantized_matmul import quantized_matmul


def _tpu_device(topology: str):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install libtpu): cannot compile for a TPU topology")
  # Compiling needs no TPU; let several test processes (CI shards, a busy dev box) load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology, "tpu").devices[0]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("shape", [(8, 8192, 8192), (512, 2048, 6144)])
@pytest.mark.parametrize("ternary", [False, True])
def test_tpu_kernel_compiles(topology, shape, ternary, monkeypatch):
  sharding = jax.sharding.SingleDeviceSharding(_tpu_device(topology))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # "auto" picks the TPU kernel
  m, k, n = shape
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  w = spec((n, k // 16), jnp.uint32) if ternary else spec((n, k), jnp.int8)
  fn = jax.jit(lambda x, w, xs, ws: quantized_matmul(x, w, (xs, ws)))
  compiled = fn.trace(spec((m, k), jnp.int8), w, spec((m,), jnp.float32), spec((n,), jnp.float32)).lower(
      lowering_platforms=("tpu",)).compile()
  assert "tpu_custom_call" in compiled.as_text()
