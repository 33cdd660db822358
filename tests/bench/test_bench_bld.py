"""The BLD sampling benchmark: its model sizes are configs/bld.py's, it runs without the data stack,
its bfloat16 autocast reaches every compute module, and a tiny run prints the table."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
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


def test_autocast_computes_in_bfloat16_and_keeps_float32_params():
  pipeline = bench.build_pipeline("tiny", "float32")
  decode = nnx.jit(bld_sample.decode)
  bits = jax.random.bernoulli(jax.random.key(0), 0.5, (2, 64, 32)).astype(jnp.uint8)
  high = decode(pipeline.autoencoder, bits)
  for model in (pipeline.denoiser, pipeline.autoencoder):
    bench.autocast(model, jnp.bfloat16)
  modules = [m for model in (pipeline.denoiser, pipeline.autoencoder)
             for _, m in nnx.iter_graph(model) if isinstance(m, bench._COMPUTE_MODULES)]
  assert modules and all(m.dtype == jnp.bfloat16 for m in modules)
  params = jax.tree.leaves(nnx.state(pipeline.autoencoder, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  # Same weights, bf16 compute: the decode of the same bits agrees to bf16 accuracy.
  low = decode(pipeline.autoencoder, bits)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=0.1)
  assert not np.array_equal(low, high)


def test_tiny_run_prints_the_table(capsys):
  bench.main(["--config", "tiny", "--batch", "2", "--steps", "2", "--trials", "1",
              "--precisions", "bfloat16"])
  out = capsys.readouterr().out
  assert "| bfloat16 | 2 |" in out and "n/a" in out
