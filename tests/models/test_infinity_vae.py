"""Infinity BSQ VAE and its converter against the official PyTorch model (../shared/parity/infinity_vae)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity
from flax import nnx

from bitgen import configlib
from bitgen.convert import infinity as convert
from bitgen.convert.checkpoint_io import CheckpointError
from bitgen.models.infinity_vae import InfinityVAE, InfinityVAEConfig
from bitgen.quantizers import multiscale
from configs import infinity as configs

GRIDS = ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8))
TINY = configlib.from_dict(InfinityVAEConfig, configs.get_config("vae_tiny").vae)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def weights():
  return load_parity("infinity_vae", "weights.npz")


@pytest.fixture(scope="module")
def io():
  return load_parity("infinity_vae", "io.npz")


@pytest.fixture(scope="module")
def vae(weights):
  return convert.load_vae(weights, TINY)


def test_param_count_matches_official():
  model = nnx.eval_shape(lambda: InfinityVAE(TINY, rngs=nnx.Rngs(0)))
  count = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert count == 1489395  # the official state_dict's parameter count (README)


def test_forward_matches_official(vae, io):
  images = jnp.asarray(io["input_images"].transpose(0, 2, 3, 1))

  @nnx.jit
  def run(model, x):
    features = model.encode_features(x)
    recon, out = model(x)  # default scales for an 8x8 latent: the fixture's GRIDS
    bits = multiscale.split_scales(out.codes, GRIDS)
    return features, recon, out.quantized, bits, model.decode_bits(bits)

  features, recon, latent, bits, from_bits = run(vae, images)
  np.testing.assert_allclose(nchw(features), io["encoder_features"], atol=1e-5)
  np.testing.assert_allclose(nchw(latent), io["summed_quantized_latent"], atol=1e-5)
  for k, b in enumerate(bits):
    np.testing.assert_array_equal(np.asarray(b), io[f"scale{k}_bit_labels"][:, 0])
  np.testing.assert_allclose(nchw(recon), io["decoder_output_unclamped"], atol=1e-4)
  np.testing.assert_allclose(nchw(from_bits), io["reconstruction_from_bit_labels"], atol=1e-4)


def _params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_converter_accepts_official_wrappings(vae, weights):
  reference = _params(vae)
  bare = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
          .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in weights.items()}
  assert len(bare) == len(weights)
  for source, kwargs in [({"vae": bare, "ema": {}}, {}), ({"vae": {}, "ema": weights}, {"use_ema": True})]:
    loaded = _params(convert.load_vae(source, TINY, **kwargs))
    assert loaded.keys() == reference.keys()
    for path in reference:
      np.testing.assert_array_equal(loaded[path], reference[path])


def test_converter_rejects_wrong_checkpoints(weights):
  model = nnx.eval_shape(lambda: InfinityVAE(TINY, rngs=nnx.Rngs(1)))
  missing = {k: v for k, v in weights.items() if "decoder.conv_out" not in k}
  with pytest.raises(CheckpointError, match="lacks.*decoder.conv_out"):
    convert.load_vae_params(model, missing)
  with pytest.raises(CheckpointError, match="does not use.*transformer.extra"):
    convert.load_vae_params(model, {**weights, "transformer.extra": np.zeros(3)})
  wide = {k: (np.zeros((v.shape[0], 32, *v.shape[2:]), v.dtype) if k == "decoder.conv_in.conv.weight" else v)
          for k, v in weights.items()}
  with pytest.raises(CheckpointError, match="decoder.conv_in.conv.weight.*different config"):
    convert.load_vae_params(model, wide)
  with pytest.raises(CheckpointError, match="ema"):
    convert.load_vae_params(model, {"vae": weights}, use_ema=True)


def test_bad_inputs_raise(vae):
  with pytest.raises(ValueError, match="multiple of the VAE stride 16"):
    vae.encode_features(jnp.zeros((1, 40, 48, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    vae.encode_features(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match=r"latents \(B, h, w, 16\)"):
    vae.decode(jnp.zeros((1, 2, 2, 32)))
  with pytest.raises(ValueError, match="bits"):
    vae.decode_bits([jnp.zeros((1, 2, 2, 32), jnp.uint8)])


@pytest.mark.parametrize("variant", ["vae_d16", "vae_d24", "vae_d32", "vae_d64", "vae_d14_f8"])
def test_released_configs_build(variant):
  config = configlib.from_dict(InfinityVAEConfig, configs.get_config(variant).vae)
  out = jax.eval_shape(lambda x: InfinityVAE(config, rngs=nnx.Rngs(0)).encoder(x),
                       jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert out.shape == (1, 64 // config.patch_size, 64 // config.patch_size, config.codebook_dim)
  model = nnx.eval_shape(lambda: InfinityVAE(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    assert "logical_axes" in variable.get_metadata(), path


def test_trains_with_the_tokenizer_task():
  """L1 + the multi-scale quantizer loss through the foundation's tokenizer task; STE gradients
  reach the encoder, and a few Adam steps lower the loss."""
  import optax
  from bitgen.train.tokenizer import TokenizerTask
  config = InfinityVAEConfig(codebook_dim=8, base_channels=32, channel_mult=(1, 1, 1), num_res_blocks=1,
                             patch_size=4)
  task = TokenizerTask(model_fn=lambda rngs: InfinityVAE(config, rngs=rngs))
  model = task.build_model(nnx.Rngs(0))
  images = jnp.tanh(jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    (loss, metrics), grads = nnx.value_and_grad(
        lambda m: task.loss(m, {"image": images}, step=jnp.array(0), rng=jax.random.key(1)),
        has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, metrics, grads

  loss0, metrics, grads = step(model, optimizer)
  assert {"l1", "quant_loss"} <= set(metrics)
  assert float(jnp.abs(grads.encoder.conv_in.kernel[...]).sum()) > 0
  for _ in range(5):
    loss, _, _ = step(model, optimizer)
  assert float(loss) < float(loss0)
