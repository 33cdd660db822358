"""Binary autoencoder of Binary Latent Diffusion: parity with the official model, converter, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity
from flax import nnx

from bitgen import configlib
from bitgen.convert import bld as convert
from bitgen.models import bld_autoencoder as ae_lib
from configs import bld as bld_configs


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def tiny_config(**overrides) -> ae_lib.Config:
  values = dict(bld_configs.get_config("tiny").autoencoder)
  values.update(overrides)
  return configlib.from_dict(ae_lib.Config, values)


def abstract_model(config: ae_lib.Config) -> ae_lib.BinaryAutoencoder:
  """Parameters as shapes only: converters fill them without a (slow, eager) random init."""
  return nnx.eval_shape(lambda: ae_lib.BinaryAutoencoder(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def fixture():
  return load_parity("bld", "io.npz"), load_parity("bld", "weights_ae.npz")


@pytest.fixture(scope="module")
def loaded(fixture):
  _, weights = fixture
  return convert.load_autoencoder(abstract_model(tiny_config()), weights)


def test_parity_with_official_autoencoder(fixture, loaded):
  io, _ = fixture

  @nnx.jit
  def run(model, images, bits):
    features = model.encode_features(images)
    out = model.quantize(model.encode_probs(images))
    recon, _ = model(images)
    return (features, model.encode_probs(images), out, model.embed_bits(out.quantized), recon,
            model.decode(bits))

  features, probs, out, z_q, recon, from_code = run(
      loaded, jnp.asarray(nhwc(io["ae_input_images"])), jnp.asarray(nhwc(io["ae_bits"])))
  np.testing.assert_allclose(features, nhwc(io["ae_encoder_out"]), atol=1e-4)
  np.testing.assert_allclose(probs, nhwc(io["ae_probs"]), atol=1e-5)
  np.testing.assert_array_equal(out.codes, nhwc(io["ae_bits"]))
  np.testing.assert_allclose(out.quantized, nhwc(io["ae_z_flow"]), atol=1e-6)
  np.testing.assert_allclose(out.metrics["codebook_loss"], io["ae_codebook_loss"], rtol=1e-5)
  np.testing.assert_allclose(z_q, nhwc(io["ae_z_q"]), atol=1e-5)
  np.testing.assert_allclose(recon, nhwc(io["ae_decoder_out"]), atol=1e-4)
  np.testing.assert_allclose(from_code, nhwc(io["ae_decoder_out_from_code"]), atol=1e-4)


def test_wrapped_binarygan_checkpoint_loads_the_same(fixture, loaded):
  _, weights = fixture
  wrapped = {f"ae.{k}": v for k, v in weights.items()}
  wrapped["disc.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
  wrapped["perceptual.net.slice1.0.weight"] = np.zeros((64, 3, 3, 3), np.float32)
  model = convert.load_autoencoder(abstract_model(tiny_config()), wrapped)
  ours = jax.tree.leaves(nnx.state(model, nnx.Param))
  ref = jax.tree.leaves(nnx.state(loaded, nnx.Param))
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_array_equal(a, b)


def test_every_parameter_has_logical_axes():
  model = abstract_model(tiny_config())
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_straight_through_gradient_reaches_the_encoder():
  config = tiny_config(image_size=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                       emb_dim=32, num_bits=8)
  graphdef, state = nnx.split(abstract_model(config))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(0)
  values = [rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
            for leaf in leaves]
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
  images = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), minval=-1, maxval=1)

  def loss_fn(m):
    recon, out = m(images, key=jax.random.key(1))
    return jnp.mean(jnp.abs(recon - images)), out

  grads, out = nnx.jit(nnx.grad(loss_fn, has_aux=True))(model)
  assert set(np.unique(out.codes)) <= {0, 1}
  np.testing.assert_allclose(out.quantized, out.codes.astype(np.float32), atol=1e-6)
  first_conv = grads.encoder.blocks[0].kernel[...]
  assert float(jnp.abs(first_conv).max()) > 0


def test_bad_input_errors(fixture):
  _, weights = fixture
  with pytest.raises(ValueError, match="must be multiples of 32"):
    tiny_config(base_channels=24)
  model = abstract_model(tiny_config(num_bits=16))
  with pytest.raises(ValueError, match="quantize.embed.weight"):
    convert.load_autoencoder(model, weights)
  with pytest.raises(ValueError, match="missing key 'encoder.blocks.0.bias'"):
    convert.load_autoencoder(model, {k: v for k, v in weights.items() if k != "encoder.blocks.0.bias"})
  with pytest.raises(ValueError, match="denoiser checkpoint"):
    convert.load_autoencoder(model, {"_denoise_fn.tok_emb.weight": np.zeros((16, 8))})
  with pytest.raises(ValueError, match="NHWC"):
    model.encode_probs(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="num_bits=16"):
    model.decode(jnp.zeros((1, 8, 8, 32), jnp.uint8))


@pytest.mark.parametrize("variant", ["c32", "c64", "c128"])
def test_released_configs_build_abstractly(variant):
  config = configlib.from_dict(ae_lib.Config, bld_configs.get_config(variant).autoencoder)
  model = nnx.eval_shape(lambda: ae_lib.BinaryAutoencoder(config, rngs=nnx.Rngs(0)))
  bits = jax.ShapeDtypeStruct((1, 16, 16, config.num_bits), jnp.uint8)
  images = jax.eval_shape(lambda m, b: m.decode(b), model, bits)
  assert images.shape == (1, 256, 256, 3)
