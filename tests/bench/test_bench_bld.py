"""The BLD sampling benchmark: its model sizes are configs/bld.py's, it runs without the data stack,
its bfloat16 autocast reaches every compute module, and a tiny run prints the table."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitgen.bench import bld as bench
from bitgen.sample import bld as bld_sample
from configs import bld as bld_configs


def test_bench_models_are_the_configs():
  for name in ("c64", "tiny"):
    config = bld_configs.get_config(name)
    spec = bench.CONFIGS[name]
    assert spec["autoencoder"] == dict(config.autoencoder), name
    assert spec["denoiser"] == dict(config.denoiser), name
    assert spec["total_steps"] == config.diffusion.total_steps
    assert spec["beta_type"] == config.diffusion.beta_type
    assert bench.TEMPERATURE == config.sample.temperature


def test_bench_imports_no_data_stack():
  # The GPU machine has jax/flax but no tfds, grain, ml_collections or dm-pix.
  code = ("import sys, bitgen.bench.bld; "
          "print(sorted(m for m in ('ml_collections', 'grain', 'tensorflow_datasets', 'dm_pix') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]"


@pytest.mark.slow  # ~30 s on the 2-core CI machine (builds and decodes through both precisions)
def test_autocast_computes_in_bfloat16():
  pipeline = bench.build_pipeline("tiny", "float32")
  decode = nnx.jit(bld_sample.decode)
  bits = jax.random.bernoulli(jax.random.key(0), 0.5, (2, 64, 32)).astype(jnp.uint8)
  high = decode(pipeline.autoencoder, bits)
  bench.autocast(pipeline.autoencoder, jnp.bfloat16, cast_weights=False)
  low = decode(pipeline.autoencoder, bits)
  assert low.dtype == jnp.float32
  # Same weights, bf16 compute: the decode of the same bits agrees to bf16 accuracy.
  np.testing.assert_allclose(low, high, atol=0.1)
  assert not np.array_equal(low, high)
  # Casting the Linear/Conv weights once changes nothing: they are cast before every use anyway.
  bench.autocast(pipeline.autoencoder, jnp.bfloat16)
  np.testing.assert_array_equal(decode(pipeline.autoencoder, bits), low)

  for model in (pipeline.autoencoder, bench.autocast(pipeline.denoiser, jnp.bfloat16)):
    for _, module in nnx.iter_graph(model):
      if isinstance(module, bench._COMPUTE_MODULES):
        assert module.dtype == jnp.bfloat16
      if isinstance(module, (nnx.Linear, nnx.Conv)):
        assert module.kernel.dtype == jnp.bfloat16
      if isinstance(module, (nnx.LayerNorm, nnx.GroupNorm)):
        assert module.scale.dtype == jnp.float32


@pytest.mark.slow  # ~30 s on the 2-core CI machine; the autocast test covers the pipeline build
def test_tiny_run_prints_the_table(capsys):
  bench.main(["--config", "tiny", "--batch", "2", "--steps", "2", "--trials", "1",
              "--precisions", "bfloat16"])
  out = capsys.readouterr().out
  assert "| bfloat16 | 2 |" in out and "n/a" in out
