"""BSQ-ViT against the official model (../shared/parity/bsq_vit), its configs and its input checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitgen.convert import bsq_vit as convert
from bitgen.models.bsq_vit import BSQViT, Config
from bitgen.parallel.axes import LOGICAL_AXES
from bitgen.quantizers import bsq
from configs import bsq_vit as configs
from conftest import PARITY_DIR, load_parity

ATOL = 1e-4  # the bar; observed differences are ~1e-6


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def official():
  """The official weights in our model, run once (jitted) on the fixture's inputs."""
  weights = load_parity("bsq_vit", "weights.npz")
  io = load_parity("bsq_vit", "io.npz")
  kwargs = json.loads((PARITY_DIR / "bsq_vit" / "config.json").read_text())["kwargs"]
  model = nnx.eval_shape(lambda: BSQViT(convert.config_from_official(kwargs), rngs=nnx.Rngs(0)))
  nnx.update(model, convert.convert_state_dict(weights, model))
  r = nhwc(io["r"])

  def objective(model, x):
    (recon, q), taps = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
    return q.loss + jnp.sum(recon * r), (recon, q, taps)

  @nnx.jit
  def run(model, x, zq):
    (value, (recon, q, taps)), grads = nnx.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(model, x)
    decoded = dict(from_zq=model.decode(zq), from_codes=model.decode_codes(q.codes))
    return dict(value=value, recon=recon, q=q, taps=taps, grads=grads, decoded=decoded)

  with jax.default_matmul_precision("highest"):
    out = run(model, nhwc(io["x"]), jnp.asarray(io["zq"]))
  return model, io, out


def close(ours, theirs, atol=ATOL):
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=atol, rtol=0)


def test_forward_matches_official(official):
  _, io, out = official
  q, taps = out["q"], out["taps"]
  tap = lambda module: module["__call__"][0]
  close(tap(taps["encoder"]["patch_embed"]), io["debug/encoder.conv1_out"])
  close(tap(taps["encoder"]["ln_pre"]), io["debug/encoder.ln_pre_out"])
  for i in range(2):
    close(tap(taps["encoder"]["transformer"]["blocks"][i]),
          io[f"debug/encoder.transformer.resblocks.{i}_out"])
    close(tap(taps["decoder"]["transformer"]["blocks"][i]),
          io[f"debug/decoder.transformer.resblocks.{i}_out"])
  close(tap(taps["encoder"]), io["encoder_out"])
  close(tap(taps["quant_embed"]), io["quant_embed_out"])
  close(taps["encode"][0][0], io["u"])
  close(tap(taps["post_quant_embed"]), io["post_quant_embed_out"])
  close(tap(taps["decoder"]["ln_pre"]), io["debug/decoder.ln_pre_out"])
  close(tap(taps["decoder"]["ln_post"]), io["debug/decoder.ln_post_out"])
  close(jnp.tanh(tap(taps["decoder"]["ffn"])), io["debug/decoder.ffn_out"])
  # Every sign decision is >= 7e-4 away from zero, so the codes match exactly.
  np.testing.assert_array_equal(q.quantized, io["zq"])
  np.testing.assert_array_equal(q.indices, io["indices"])
  np.testing.assert_array_equal(bsq.group_indices(q.codes, 9), io["group_indices"])
  close(nchw(out["decoded"]["from_zq"]), io["decoder_out_unclamped"])
  close(nchw(out["decoded"]["from_codes"]), io["decoder_out_unclamped"])
  close(nchw(out["recon"]), io["recon"])
  assert float(jnp.max(jnp.abs(out["recon"]))) <= 1.0
  close(q.loss, io["quant_loss"])
  close(0.25 * q.metrics["commitment"], io["commit_loss"])  # the beta = 0.25 quirk
  close(q.metrics["codebook_entropy"], io["codebook_entropy"])
  close(q.metrics["persample_entropy"], io["persample_entropy"])


def test_gradients_match_official(official):
  model, io, out = official
  grads, grad_x = out["grads"]
  close(out["value"], io["train_objective"])
  close(nchw(grad_x), io["grad_x"], atol=1e-5 * np.abs(io["grad_x"]).max())
  official_grads = convert.state_to_official(nnx.state(grads, nnx.Param), model.config)
  names = [k[len("grad/"):] for k in io if k.startswith("grad/")]
  assert len(names) == 6
  for name in names:
    expected = io[f"grad/{name}"]
    close(official_grads[name], expected, atol=1e-5 * max(np.abs(expected).max(), 1.0))


def abstract_param_count(config) -> int:
  model = nnx.eval_shape(lambda: BSQViT(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_parameter_counts_equal_official():
  weights = load_parity("bsq_vit", "weights.npz")
  kwargs = json.loads((PARITY_DIR / "bsq_vit" / "config.json").read_text())["kwargs"]
  official_floats = sum(v.size for v in weights.values() if v.dtype.kind == "f")
  assert abstract_param_count(convert.config_from_official(kwargs)) == official_floats == 1006866


def test_b18_has_the_official_174_8m_parameters():
  # Sum of the official VITBSQModel B/8 state-dict parameters (embed_dim 18): 174,816,210.
  b18 = abstract_param_count(configs.get_config("b18").model)
  assert b18 == 174_816_210
  # 36 bits only widen quant_embed and post_quant_embed.
  assert abstract_param_count(configs.get_config("b36").model) - b18 == 18 * (768 + 1) + 18 * 768


@pytest.mark.parametrize("variant", ["tiny", "small", "b18", "b36"])
def test_configs_build(variant):
  config = configs.get_config(variant)
  model = nnx.eval_shape(lambda: BSQViT(config.model, rngs=nnx.Rngs(0)))
  assert model.quantizer.dim == config.model.quantizer.num_bits
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get(LOGICAL_AXES)
    assert axes is not None and len(axes) == len(var.shape), path


MINI = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, decoder_ffn_dim=32,
            quantizer=dict(name="bsq", num_bits=18, group_size=9, persample_entropy="analytical"))


def test_round_trip_shapes_and_jit():
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)

  @jax.jit
  def run(images):  # built inside: one compile instead of one per initializer
    model = BSQViT(MINI, rngs=nnx.Rngs(0))
    recon, q = model(images)
    u, _ = model.encode(images)
    return recon, q, u, model.decode_codes(q.codes), model.decode(q.quantized)

  recon, q, u, from_codes, from_values = run(images)
  assert recon.shape == images.shape and q.codes.shape == (2, 4, 18) and q.indices.shape == (2, 4)
  assert float(jnp.max(jnp.abs(recon))) <= 1.0
  np.testing.assert_allclose(jnp.linalg.norm(u, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(from_codes, from_values, atol=1e-6)


@pytest.fixture(scope="module")
def mini():
  return nnx.eval_shape(lambda: BSQViT(MINI, rngs=nnx.Rngs(0)))  # input checks need no weights


def test_bad_images_raise_one_clear_error(mini):
  good = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="16x16"):
    mini.encode(jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="channels.*NCHW"):
    mini.encode(good.transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="NHWC"):
    mini.encode(good[0])
  with pytest.raises(TypeError, match="floating-point.*uint8"):
    mini.encode(jnp.zeros((1, 16, 16, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[0, 255\]"):
    mini(good.at[0, 0, 0, 0].set(255.0))
  with pytest.raises(ValueError, match="latents of shape"):
    mini.decode(jnp.zeros((1, 4, 17)))


def test_range_is_checked_only_on_concrete_images(mini):
  mini.check_images(jnp.full((1, 16, 16, 3), 1.005))  # a resampling overshoot is tolerated
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    mini.check_images(jnp.full((1, 16, 16, 3), 1.02))
  # While tracing (jit, eval_shape) values are unknown: documented as not checked.
  recon, _ = nnx.eval_shape(lambda m, x: m(x), mini, jnp.full((1, 16, 16, 3), 5.0))
  assert recon.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("quantizer", [
    dict(name="lfq", num_bits=10), dict(name="fsq", levels=(8, 5, 5, 5))])
def test_quantizer_sub_dict_picks_the_quantizer(quantizer):
  model = nnx.eval_shape(
      lambda: BSQViT({**MINI, "quantizer": quantizer, "l2_normalize": False}, rngs=nnx.Rngs(0)))
  dim = model.quantizer.dim
  assert model.quant_embed.kernel.shape == (32, dim) and model.post_quant_embed.kernel.shape == (dim, 32)
  recon, q = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((2, 16, 16, 3)))
  assert recon.shape == (2, 16, 16, 3) and q.quantized.shape == q.codes.shape == (2, 4, dim)


def test_linear_kind_reaches_the_transformer_blocks_only():
  from bitgen.nn.bitlinear import BitLinear
  model = nnx.eval_shape(lambda: BSQViT({**MINI, "linear": "bitnet"}, rngs=nnx.Rngs(0)))
  block = model.decoder.transformer.blocks[0]
  assert all(isinstance(layer, BitLinear) for layer in (
      block.attn.query, block.attn.key, block.attn.value, block.attn.out, block.mlp.up, block.mlp.down))
  assert type(model.encoder.patch_embed) is nnx.Linear and type(model.decoder.to_pixels) is nnx.Linear
  recon, _ = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 16, 16, 3)))
  assert recon.shape == (1, 16, 16, 3)


def test_bad_configs_raise_one_clear_error():
  model = configs.get_config("tiny").model.to_dict()
  with pytest.raises(ValueError, match="patch_size 7 does not divide image_size 64"):
    BSQViT({**model, "patch_size": 7}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_bits=18 is not divisible by group_size=4"):
    BSQViT({**model, "quantizer": {**model["quantizer"], "group_size": 4}}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['layers'\]"):
    BSQViT({**model, "layers": 2}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="width 128 is not divisible by heads 3"):
    Config(**{**model, "heads": 3})
  with pytest.raises(ValueError, match="unknown linear kind 'ternary'"):
    BSQViT({**model, "linear": "ternary"}, rngs=nnx.Rngs(0))
