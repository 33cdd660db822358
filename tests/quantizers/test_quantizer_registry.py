"""`bitgen.quantizers.build` and the NNX wrappers: one interface for BSQ, LFQ and FSQ."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bitgen import quantizers

EQUAL_BITS = {
    "bsq": {"name": "bsq", "num_bits": 18, "group_size": 9},
    "lfq": {"name": "lfq", "num_bits": 18, "flavour": "open_magvit2"},
    "fsq": {"name": "fsq", "levels": [4] * 9},
}


@pytest.mark.parametrize("name", sorted(EQUAL_BITS))
def test_equal_bits_from_config_dict(name):
  q = quantizers.build(ml_collections.ConfigDict(EQUAL_BITS[name]))
  assert q.num_bits == 18 and q.dim == (9 if name == "fsq" else 18)
  assert not jax.tree.leaves(nnx.state(q, nnx.Param))
  z = jax.random.normal(jax.random.key(0), (2, 8, q.dim))
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  out = q(z)
  assert out.quantized.shape == z.shape and out.codes.shape == z.shape
  assert out.indices.shape == (2, 8) and out.indices.dtype == jnp.int32 and out.loss.shape == ()
  assert 0 < out.metrics["code_usage"] <= 1
  np.testing.assert_array_equal(q.decode_codes(out.codes), q.decode_indices(out.indices))
  np.testing.assert_allclose(q.decode_codes(out.codes), out.quantized, atol=1e-7)
  # The modules go through nnx transforms like any model part.
  graphdef, state = nnx.split(q)
  jitted = nnx.jit(lambda q, z: q(z))(nnx.merge(graphdef, state), z)
  np.testing.assert_array_equal(jitted.indices, out.indices)
  np.testing.assert_allclose(jitted.loss, out.loss, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EQUAL_BITS))
def test_bfloat16_latents(name):
  q = quantizers.build(EQUAL_BITS[name])
  z = jax.random.normal(jax.random.key(1), (2, 8, q.dim))
  out16, out32 = q(z.astype(jnp.bfloat16)), q(z.astype(jnp.bfloat16).astype(jnp.float32))
  assert out16.quantized.dtype == jnp.bfloat16 and out16.loss.dtype == jnp.float32
  np.testing.assert_array_equal(out16.codes, out32.codes)
  np.testing.assert_allclose(out16.loss, out32.loss, atol=1e-5)


def test_bad_config():
  with pytest.raises(ValueError, match="unknown quantizer name None"):
    quantizers.build({"num_bits": 18})
  with pytest.raises(ValueError, match=r"missing key\(s\) \['num_bits'\]"):
    quantizers.build({"name": "lfq"})
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['group'\].*valid keys"):
    quantizers.build(ml_collections.ConfigDict({"name": "bsq", "num_bits": 18, "group": 9}))
  with pytest.raises(ValueError, match="num_bits=18 is not divisible by group_size=4"):
    quantizers.build({"name": "bsq", "num_bits": 18, "group_size": 4})
