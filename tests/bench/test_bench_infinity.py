"""The Infinity benchmark module: random weights of the right dtype, and a tiny smoke run."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bitgen.bench import infinity as bench
from bitgen.models.infinity import Infinity


def test_random_module_has_the_models_structure_in_the_asked_dtype():
  config, _ = bench._model_configs("layer12", tiny=True)
  model = bench.random_module(lambda: Infinity(config, rngs=nnx.Rngs(0)), 0, jnp.bfloat16)
  reference = nnx.eval_shape(lambda: Infinity(config, rngs=nnx.Rngs(0)))
  shapes = jax.tree.map(lambda a: a.shape, nnx.state(model))
  assert shapes == jax.tree.map(lambda a: a.shape, nnx.state(reference))
  assert {a.dtype for a in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
  assert 0.01 < float(jnp.std(model.blocks[0].sa.mat_qkv.kernel[...].astype(jnp.float32))) < 0.03


@pytest.mark.slow
def test_tiny_rows_run(capsys):
  bench.main(["--tiny", "--trials", "1", "--rows", "layer12 256 b8", "layer12 train 256 b8"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| layer12")]
  assert len(rows) == 2 and not any("FAILED" in row for row in rows)
