"""Binary Latent Diffusion denoiser (`TransformerBD`): parity, converter, label masking, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity
from flax import nnx

from bitgen import configlib
from bitgen.convert import bld as convert
from bitgen.models import bld_denoiser as den_lib
from bitgen.sample import binary_diffusion as bd
from configs import bld as bld_configs


def tiny_config(**overrides) -> den_lib.Config:
  values = dict(bld_configs.get_config("tiny").denoiser)
  values.update(overrides)
  return configlib.from_dict(den_lib.Config, values)


def abstract_model(config: den_lib.Config) -> den_lib.Denoiser:
  return nnx.eval_shape(lambda: den_lib.Denoiser(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def fixture():
  return load_parity("bld", "io.npz"), load_parity("bld", "weights_sampler.npz")


@pytest.fixture(scope="module")
def loaded(fixture):
  _, weights = fixture
  return convert.load_denoiser(abstract_model(tiny_config()), weights, schedule=bd.noise_schedule(16))


def test_sincos_position_init_matches_official(fixture):
  io, _ = fixture
  np.testing.assert_allclose(den_lib.sincos_positions_2d(64, 8), io["den_pos_emb_init_sincos"][0], atol=1e-7)
  model = den_lib.Denoiser(tiny_config(depth=0), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.pos_emb[...], den_lib.sincos_positions_2d(64, 8))


def test_parity_with_official_denoiser(fixture, loaded):
  io, _ = fixture
  bits, t, labels = (jnp.asarray(io[k]) for k in ("den_x_t", "den_t", "den_label"))
  np.testing.assert_allclose(loaded.embed(bits, t, labels), io["den_block0_input_cond"], atol=1e-4)
  np.testing.assert_allclose(loaded.embed(bits, t), io["den_block0_input_uncond"], atol=1e-4)
  run = nnx.jit(lambda m, b, t, l: (m(b, t, l), m(b, t)))
  cond, uncond = run(loaded, bits, t, labels)
  np.testing.assert_allclose(cond, io["den_logits_cond"], atol=1e-4)
  np.testing.assert_allclose(uncond, io["den_logits_uncond"], atol=1e-4)


def test_masked_class_token_equals_no_class_token(fixture, loaded):
  io, _ = fixture
  bits, t, labels = (jnp.asarray(io[k]) for k in ("den_x_t", "den_t", "den_label"))
  both = loaded(jnp.concatenate([bits, bits]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, labels]), drop_labels=jnp.array([False, False, True, True]))
  np.testing.assert_allclose(both[:2], io["den_logits_cond"], atol=1e-4)
  np.testing.assert_allclose(both[2:], io["den_logits_uncond"], atol=1e-4)


def test_bare_transformer_state_dict_loads_the_same(fixture, loaded):
  _, weights = fixture
  bare = {k.removeprefix("_denoise_fn."): v for k, v in weights.items() if k.startswith("_denoise_fn.")}
  model = convert.load_denoiser(abstract_model(tiny_config()), bare)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(loaded, nnx.Param)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_gradients_reach_every_parameter():
  config = tiny_config(latent_size=2, num_bits=4, width=8, heads=2, depth=1)
  model = den_lib.Denoiser(config, rngs=nnx.Rngs(0))
  bits = jax.random.bernoulli(jax.random.key(0), 0.5, (2, 4, 4)).astype(jnp.uint8)

  def loss_fn(m):
    return jnp.sum(m(bits, jnp.array([1, 3]), jnp.array([0, 9])) ** 2)

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  for path, g in nnx.to_flat_state(grads):
    assert float(jnp.abs(g[...]).max()) > 0, path


def test_every_parameter_has_logical_axes():
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(tiny_config()), nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_bad_input_errors(fixture):
  _, weights = fixture
  with pytest.raises(ValueError, match="num_classes=0"):
    convert.load_denoiser(abstract_model(tiny_config(num_classes=0)), weights)
  with pytest.raises(ValueError, match="tok_emb.weight"):
    convert.load_denoiser(abstract_model(tiny_config(num_bits=16)), weights)
  with pytest.raises(ValueError, match="not a denoiser one"):
    convert.load_denoiser(abstract_model(tiny_config()), {"ae.encoder.blocks.0.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="T=16 diffusion steps, the config has total_steps=64"):
    convert.load_denoiser(abstract_model(tiny_config()), weights, schedule=bd.noise_schedule(64))
  with pytest.raises(ValueError, match="wrong beta_type"):
    convert.load_denoiser(abstract_model(tiny_config()), weights, schedule=bd.noise_schedule(16, "cos"))
  model = abstract_model(tiny_config())
  with pytest.raises(ValueError, match=r"x_t must be \(B, 64, 32\)"):
    model(jnp.zeros((1, 64, 16), jnp.uint8), jnp.array([1]))
  unconditional = abstract_model(tiny_config(num_classes=0))
  with pytest.raises(ValueError, match="unconditional"):
    unconditional(jnp.zeros((1, 64, 32), jnp.uint8), jnp.array([1]), jnp.array([0]))


@pytest.mark.parametrize("variant", ["c32", "c64", "c128"])
def test_released_configs_build_abstractly(variant):
  config = configlib.from_dict(den_lib.Config, bld_configs.get_config(variant).denoiser)
  model = abstract_model(config)
  bits = jax.ShapeDtypeStruct((2, 256, config.num_bits), jnp.uint8)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  assert jax.eval_shape(lambda m, b, t: m(b, t), model, bits, t).shape == (2, 256, config.num_bits)
