"""Infinity transformer and its converter vs the official model (../shared/parity/infinity_transformer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity
from flax import nnx

from bitgen import configlib
from bitgen.convert import infinity as convert
from bitgen.convert.checkpoint_io import CheckpointError
from bitgen.models import infinity_loss
from bitgen.models import infinity_schedules as schedules
from bitgen.models.infinity import Infinity, InfinityConfig, check_vae_compatible, pad_packed_text
from bitgen.nn import infinity_blocks
from configs import infinity as configs

TINY = configlib.from_dict(InfinityConfig, configs.get_config("tiny").model)
SCHEDULE = schedules.schedule_for(1.0, "0.06M")


@pytest.fixture(scope="module")
def weights():
  return load_parity("infinity_transformer", "weights.npz")


@pytest.fixture(scope="module")
def io():
  return load_parity("infinity_transformer", "io.npz")


@pytest.fixture(scope="module")
def model(weights):
  return convert.load_transformer(weights, TINY)


def padded_text(io):
  return jnp.asarray(pad_packed_text(io["text_kv_compact"], io["text_lens"])), jnp.asarray(io["text_lens"])


@nnx.jit(static_argnums=2)
def teacher_forcing(model, x, schedule, text, lengths, drop):
  return model(x, schedule, text=text, text_lengths=lengths, drop=drop)


def official_param_count(c: InfinityConfig) -> int:
  """Parameter count of the official state_dict for these sizes (shapes from infinity.py / basic.py)."""
  C, Ct5, d, hidden = c.embed_dim, c.text_channels, c.num_bits, c.mlp_hidden
  top = (c.text_maxlen * Ct5 + C + Ct5                      # cfg_uncond, pos_start, text_norm
         + C + C + Ct5 * 2 * C + C * C + C                  # attentive pool: mat_q, v_bias, mat_kv, proj
         + Ct5 * C + C + C * C + C                          # text_proj_for_ca
         + 15 * C + d * C + C + 6 * C * C + 6 * C           # lvl_embed, word_embed, shared_ada_lin
         + 2 * C * C + 2 * C + C * 2 * d + 2 * d)           # head_nm, head
  block = (6 * C + c.num_heads + 2 * C + 3 * C * C + C * C + C    # ada_gss, self-attention
           + C + C * C + C + 2 * C * C + C * C + C                # cross-attention
           + C * hidden + hidden + hidden * C + C + 2 * C)        # ffn, ca_norm
  return top + c.depth * block


def count(config: InfinityConfig) -> int:
  abstract = nnx.eval_shape(lambda: Infinity(config, rngs=nnx.Rngs(0)))
  return sum(v.size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def test_param_counts():
  assert count(TINY) == official_param_count(TINY) == 951784  # fixture README
  for variant, billions in [("layer12", 0.125), ("2b", 2.205), ("8b", 8.376)]:
    config = configlib.from_dict(InfinityConfig, configs.get_config(variant).model)
    assert count(config) == official_param_count(config)
    assert round(count(config) / 1e9, 3) == billions


def test_teacher_forcing_logits_match_official(model, io):
  text, lengths = padded_text(io)
  x = jnp.asarray(io["x_BLC_wo_prefix"])
  cond = teacher_forcing(model, x, SCHEDULE, text, lengths, jnp.zeros(2, bool))
  np.testing.assert_allclose(cond, io["logits_cond"], atol=1e-5)
  uncond = teacher_forcing(model, x, SCHEDULE, text, lengths, jnp.ones(2, bool))
  np.testing.assert_allclose(uncond, io["logits_uncond"], atol=1e-5)
  per_bit = infinity_loss.bitwise_cross_entropy(cond, jnp.asarray(io["gt_bit_labels_BLd"]))
  np.testing.assert_allclose(per_bit, io["loss_per_bit_BLd"], atol=1e-5)
  weights = infinity_loss.scale_loss_weights(SCHEDULE)
  np.testing.assert_allclose(weights, io["loss_token_weights"], rtol=1e-6)
  loss = infinity_loss.bitwise_loss(cond, jnp.asarray(io["gt_bit_labels_BLd"]), weights)
  np.testing.assert_allclose(loss, io["loss_total"], rtol=1e-5)


def test_condition_intermediates_match_official(model, io):
  text, lengths = padded_text(io)
  c = model.condition(text=text, text_lengths=lengths)
  np.testing.assert_allclose(c.cond, io["cond_sos_cond_BD"], atol=1e-5)
  np.testing.assert_allclose(c.shared_gss, io["cond_shared_ada_lin_out"], atol=1e-5)
  packed = np.concatenate([np.asarray(c.text)[b, :n] for b, n in enumerate(io["text_lens"])])
  np.testing.assert_allclose(packed, io["cond_ca_kv_projected"], atol=1e-5)
  x = model.embed(c, jnp.asarray(io["x_BLC_wo_prefix"]), SCHEDULE)
  np.testing.assert_allclose(x, io["cond_x_BLC_after_lvl_embed"], atol=1e-5)
  null = model.condition(text=text, text_lengths=lengths, drop=jnp.ones(2, bool))
  np.testing.assert_allclose(null.cond, io["uncond_sos_cond_BD"], atol=1e-5)


def test_rope_table_matches_official(io):
  cos, sin = infinity_blocks.rope2d_cos_sin(SCHEDULE.grids, SCHEDULE.rope_grid, TINY.head_dim)
  np.testing.assert_allclose(cos, io["rope2d_cos_sin"][0], atol=1e-6)
  np.testing.assert_allclose(sin, io["rope2d_cos_sin"][1], atol=1e-6)
  # The 1.333 ratio's 1M grid is 72x54: scale 16x12 sits on rows round(i * 4.5), half to even.
  cos, _ = infinity_blocks.rope2d_cos_sin(((16, 12),), (72, 54), 8)
  rows = np.round(np.arccos(np.clip(cos[::12, 0], -1, 1)), 3)  # pair 0: angle = row position
  np.testing.assert_allclose(rows[:4], np.round(np.arccos(np.cos([0.0, 4.0, 9.0, 14.0])), 3))


def test_converter_layouts(weights, model):
  reference = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  flash = {}
  for key, value in weights.items():
    key = key.replace("block_chunks.0.module.", "blocks.").replace("block_chunks.1.module.0", "blocks.2")
    key = key.replace("block_chunks.1.module.1", "blocks.3")
    flash[key] = value.reshape(1, 1, -1, 1) if key.endswith("scale_mul_1H11") else value
  loaded = convert.load_transformer(flash, TINY)
  for path, variable in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(variable.get_value()), reference[path])
  shorter = configlib.from_dict(InfinityConfig, {**configs.get_config("tiny").model, "text_maxlen": 8})
  assert convert.load_transformer(weights, shorter).cfg_uncond.shape == (8, 512)


def test_converter_rejects_wrong_checkpoints(weights):
  with pytest.raises(CheckpointError, match="lacks.*head.weight"):
    convert.load_transformer({k: v for k, v in weights.items() if not k.startswith("head.")}, TINY)
  vae = load_parity("infinity_vae", "weights.npz")
  with pytest.raises(CheckpointError, match="lacks"):
    convert.load_transformer(vae, TINY)
  wider = configlib.from_dict(InfinityConfig, {**configs.get_config("tiny").model, "num_bits": 32})
  with pytest.raises(CheckpointError, match="has shape .* does not fit .*different config"):
    convert.load_transformer(weights, wider)
  longer = configlib.from_dict(InfinityConfig, {**configs.get_config("tiny").model, "text_maxlen": 32})
  with pytest.raises(CheckpointError, match="cfg_uncond has 16 rows"):
    convert.load_transformer(weights, longer)
  with pytest.raises(CheckpointError, match="does not use.*blocks.4"):
    convert.load_transformer({**weights, "blocks.4.ffn.fc1.bias": np.zeros(512)}, TINY)


def test_bad_inputs_raise(model, io):
  text, lengths = padded_text(io)
  x = jnp.asarray(io["x_BLC_wo_prefix"])
  with pytest.raises(ValueError, match=r"text lengths must lie in \[1, 9\]"):
    model(x, SCHEDULE, text=text, text_lengths=jnp.array([0, 9]))
  with pytest.raises(ValueError, match=r"text lengths must lie in \[1, 9\]"):
    model(x, SCHEDULE, text=text, text_lengths=jnp.array([5, 10]))
  with pytest.raises(ValueError, match="exceeds text_maxlen=16"):
    model(x, SCHEDULE, text=jnp.zeros((2, 17, 512)), text_lengths=lengths)
  with pytest.raises(ValueError, match=r"\(B, S, 512\)"):
    model(x, SCHEDULE, text=jnp.zeros((2, 9, 256)), text_lengths=lengths)
  with pytest.raises(ValueError, match=r"x_wo_prefix must be \(B, 520, 16\)"):
    model(jnp.zeros((2, 520, 32)), SCHEDULE, text=text, text_lengths=lengths)
  with pytest.raises(ValueError, match=r"x_wo_prefix must be \(B, 2520, 16\)"):
    model(x, schedules.schedule_for(1.0, "0.25M"), text=text, text_lengths=lengths)
  with pytest.raises(TypeError, match="Schedule"):
    model(x, SCHEDULE.grids, text=text, text_lengths=lengths)
  with pytest.raises(ValueError, match="labels"):
    model(x, SCHEDULE, labels=jnp.array([1, 2]))
  with pytest.raises(ValueError, match="32 bits per token but the transformer predicts 16"):
    check_vae_compatible(32, TINY)
  check_vae_compatible(14, configlib.from_dict(InfinityConfig, configs.get_config("8b").model))


def test_pad_packed_text():
  packed = np.arange(10, dtype=np.float32).reshape(5, 2)
  padded = pad_packed_text(packed, [2, 3])
  np.testing.assert_array_equal(padded[0], [[0, 1], [2, 3], [0, 0]])
  np.testing.assert_array_equal(padded[1], [[4, 5], [6, 7], [8, 9]])
  with pytest.raises(ValueError, match="sum\\(lengths\\)=6"):
    pad_packed_text(packed, [3, 3])


def test_class_conditional_model_trains_through_the_text_path():
  config = InfinityConfig(embed_dim=64, depth=2, num_heads=2, num_bits=8, text_channels=128,
                          text_maxlen=1, num_classes=5)
  model = Infinity(config, rngs=nnx.Rngs(0))
  schedule = schedules.schedule_for(1.0, "0.06M").prefix(3)
  x = jax.random.normal(jax.random.key(0), (2, schedule.num_tokens - 1, 8))
  labels = jnp.array([1, 4])

  @nnx.jit
  def forward(model, labels, drop):
    return model(x, schedule, labels=labels, drop=drop)

  def loss(model, drop):
    logits = forward(model, labels, drop)
    return jnp.mean(logits ** 2), logits

  (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, jnp.zeros(2, bool))
  assert logits.shape == (2, schedule.num_tokens, 16)
  assert float(jnp.abs(grads.class_emb[...][jnp.array([1, 4])]).sum()) > 0
  assert float(jnp.abs(grads.class_emb[...][0]).sum()) == 0
  dropped = forward(model, labels, jnp.ones(2, bool))
  other = forward(model, jnp.array([0, 2]), jnp.ones(2, bool))
  np.testing.assert_allclose(dropped, other, atol=1e-6)  # the null class ignores the label
  with pytest.raises(ValueError, match=r"class labels must lie in \[0, 5\)"):
    model(x, schedule, labels=jnp.array([5, 0]))
  with pytest.raises(ValueError, match="not text"):
    model(x, schedule, text=jnp.zeros((2, 1, 128)), text_lengths=jnp.ones(2, jnp.int32))


@pytest.mark.parametrize("linear_kind, attention_kind", [("bitnet", "dense"), ("dense", "binary")])
def test_linear_and_attention_switches_reach_the_model(linear_kind, attention_kind):
  config = InfinityConfig(embed_dim=64, depth=1, num_heads=2, num_bits=4, text_channels=128,
                          text_maxlen=1, num_classes=2, linear=linear_kind, attention=attention_kind)
  dense = dataclasses.replace(config, linear="dense", attention="dense")
  model, reference = Infinity(config, rngs=nnx.Rngs(0)), Infinity(dense, rngs=nnx.Rngs(0))
  schedule = schedules.schedule_for(1.0, "0.06M").prefix(2)
  x = jax.random.normal(jax.random.key(0), (2, schedule.num_tokens - 1, 4))
  forward = nnx.jit(lambda m: m(x, schedule, labels=jnp.array([0, 1])))
  logits = forward(model)
  assert logits.shape == (2, schedule.num_tokens, 8) and np.isfinite(np.asarray(logits)).all()
  assert not np.allclose(logits, forward(reference), atol=1e-4)  # the switch changed the math


def test_config_rejects_an_empty_ffn():
  with pytest.raises(ValueError, match="FFN width"):
    InfinityConfig(embed_dim=32, depth=1, num_heads=2, num_bits=4, text_channels=128)
