"""Next-scale sampling with a KV cache against the official `autoregressive_infer_cfg` (top_k=1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_parity
from flax import nnx

from bitgen import configlib
from bitgen.convert import infinity as convert
from bitgen.models import infinity_schedules as schedules
from bitgen.models.infinity import Infinity, InfinityConfig, pad_packed_text
from bitgen.quantizers import multiscale
from bitgen.sample import next_scale
from configs import infinity as configs

TINY = configlib.from_dict(InfinityConfig, configs.get_config("tiny").model)
SCHEDULE = schedules.schedule_for(1.0, "0.06M")


@pytest.fixture(scope="module")
def io():
  return load_parity("infinity_transformer", "io.npz")


@pytest.fixture(scope="module")
def model():
  return convert.load_transformer(load_parity("infinity_transformer", "weights.npz"), TINY)


def padded_text(io):
  return jnp.asarray(pad_packed_text(io["text_kv_compact"], io["text_lens"])), jnp.asarray(io["text_lens"])


def test_greedy_generation_matches_official(model, io):
  text, lengths = padded_text(io)
  out = next_scale.generate(model, SCHEDULE, jax.random.key(0), text=text, text_lengths=lengths,
                            cfg=3.0, tau=0.5, top_k=1, return_logits=True)
  for k in range(SCHEDULE.num_scales):
    np.testing.assert_allclose(out.logits[k], io[f"infer_scale{k}_logits_cfg_tau"], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.bits[k]), io[f"infer_scale{k}_bits"][:, 0])
  np.testing.assert_allclose(out.latent, multiscale.codes_from_bits(out.bits, (16, 16)), atol=1e-6)
  # Another key gives the same greedy result; the traced cfg/tau do not retrace.
  again = next_scale.generate(model, SCHEDULE, jax.random.key(7), text=text, text_lengths=lengths,
                              cfg=[3.0] * 7, tau=0.5, top_k=1, return_logits=True)
  np.testing.assert_array_equal(np.asarray(again.bits[-1]), np.asarray(out.bits[-1]))


def test_kv_cache_agrees_with_teacher_forcing(model, io):
  """Feeding the sampled bits back through the block-causal forward gives the same logits."""
  text, lengths = padded_text(io)
  schedule = SCHEDULE.prefix(5)
  out = next_scale.generate(model, schedule, jax.random.key(3), text=text, text_lengths=lengths,
                            cfg=None, tau=1.0, return_logits=True)
  latent_hw = schedule.latent_grid
  x, summed = [], jnp.zeros((2, *latent_hw, 16))  # teacher-forcing inputs built from the sampled bits
  for k, b in enumerate(out.bits[:-1]):
    summed = summed + multiscale.bilinear_resize(multiscale.bits_to_codes(b), latent_hw)
    x.append(multiscale.bilinear_resize(summed, schedule.grids[k + 1]))
  forward = nnx.jit(lambda m, x: m(x, schedule, text=text, text_lengths=lengths))
  logits = forward(model, multiscale.concat_scales(x))
  sampled_logits = jnp.concatenate([l.reshape(2, -1) for l in out.logits], 1)
  np.testing.assert_allclose(sampled_logits, logits.reshape(2, -1), atol=1e-4)
  assert multiscale.concat_scales(out.bits).shape == (2, schedule.num_tokens, 16)


def test_sampling_is_deterministic_given_key():
  config = InfinityConfig(embed_dim=64, depth=1, num_heads=2, num_bits=4, text_channels=128,
                          text_maxlen=1, num_classes=3)
  model = Infinity(config, rngs=nnx.Rngs(0))
  schedule = schedules.schedule_for(1.0, "0.06M").prefix(3)
  labels = jnp.array([0, 2])
  a = next_scale.generate(model, schedule, jax.random.key(1), labels=labels, top_p=0.9)
  b = next_scale.generate(model, schedule, jax.random.key(1), labels=labels, top_p=0.9)
  c = next_scale.generate(model, schedule, jax.random.key(2), labels=labels, top_p=0.9)
  np.testing.assert_array_equal(np.asarray(a.latent), np.asarray(b.latent))
  assert not np.array_equal(np.asarray(a.latent), np.asarray(c.latent))
  assert [x.shape for x in a.bits] == [(2, 1, 1, 4), (2, 2, 2, 4), (2, 4, 4, 4)]


def test_repeated_calls_do_not_retrace(monkeypatch):
  config = InfinityConfig(embed_dim=64, depth=1, num_heads=2, num_bits=4, text_channels=128,
                          text_maxlen=1, num_classes=3)
  model = Infinity(config, rngs=nnx.Rngs(0))
  schedule = schedules.schedule_for(1.0, "0.06M").prefix(2)
  traced = []
  step = next_scale._scale_step
  monkeypatch.setattr(next_scale, "_scale_step", lambda *a, **k: traced.append(1) or step(*a, **k))
  labels = jnp.array([0, 1])
  for i, (cfg, tau) in enumerate([(3.0, 1.0), (1.5, 0.7), ([2.0, 4.0], [1.0, 0.5])]):
    next_scale.generate(model, schedule, jax.random.key(i), labels=labels, cfg=cfg, tau=tau)
  assert len(traced) == schedule.num_scales  # one trace for every call with this schedule and batch


def test_filter_logits():
  logits = jnp.array([[0.0, 1.0, 3.0, 2.0]])
  np.testing.assert_array_equal(np.isinf(next_scale.filter_logits(logits, top_k=2)), [[1, 1, 0, 0]])
  # softmax ~ [.03, .09, .64, .24], ascending cumsum [.03, .12, .36, 1]: removed where <= 1 - top_p
  np.testing.assert_array_equal(np.isinf(next_scale.filter_logits(logits, top_p=0.9)), [[1, 0, 0, 0]])
  np.testing.assert_array_equal(np.isinf(next_scale.filter_logits(logits, top_p=0.5)), [[1, 1, 0, 1]])


def test_bad_sampling_inputs_raise(model, io):
  text, lengths = padded_text(io)
  with pytest.raises(ValueError, match=r"text lengths must lie in \[1, 9\]"):
    next_scale.generate(model, SCHEDULE, jax.random.key(0), text=text, text_lengths=jnp.array([0, 3]))
  with pytest.raises(ValueError, match="one value per scale"):
    next_scale.generate(model, SCHEDULE, jax.random.key(0), text=text, text_lengths=lengths, cfg=[3.0, 2.0])
  with pytest.raises(ValueError, match="top_p"):
    next_scale.generate(model, SCHEDULE, jax.random.key(0), text=text, text_lengths=lengths, top_p=1.5)


def test_prepared_bfloat16_sampling_follows_float32():
  """prepare(model, bfloat16) computes in bfloat16 (params and KV cache) and, greedy, picks
  nearly the same bits as float32 on a random model; prepare(model) is the float32 path."""
  config = InfinityConfig(embed_dim=64, depth=2, num_heads=2, num_bits=8, text_channels=128,
                          text_maxlen=1, num_classes=3)
  model = Infinity(config, rngs=nnx.Rngs(0))
  schedule = schedules.schedule_for(1.0, "0.06M").prefix(3)
  labels = jnp.array([0, 2])
  prepared = next_scale.prepare(model, jnp.bfloat16)
  assert prepared.dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree.leaves(prepared.blocks)} == {jnp.dtype(jnp.bfloat16)}
  assert jax.tree.leaves(prepared.blocks)[0].shape[0] == config.depth  # stacked over the blocks
  kwargs = dict(labels=labels, cfg=3.0, top_k=1, return_logits=True)
  f32 = next_scale.generate(model, schedule, jax.random.key(0), **kwargs)
  f32_prepared = next_scale.generate(next_scale.prepare(model), schedule, jax.random.key(0), **kwargs)
  bf16 = next_scale.generate(prepared, schedule, jax.random.key(0), **kwargs)
  np.testing.assert_array_equal(np.asarray(f32.latent), np.asarray(f32_prepared.latent))
  np.testing.assert_allclose(bf16.logits[0], f32.logits[0], atol=0.1, rtol=0.05)
  same = np.mean([np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(f32.bits, bf16.bits)])
  assert same > 0.9


def test_bad_sampler_options_raise():
  labels_model = Infinity(InfinityConfig(embed_dim=64, depth=1, num_heads=2, num_bits=4,
                                         text_channels=128, text_maxlen=1, num_classes=3),
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention_impl must be"):
    next_scale.generate(labels_model, SCHEDULE, jax.random.key(0), labels=jnp.array([0]),
                        attention_impl="flash")
  with pytest.raises(TypeError, match="model must be an Infinity"):
    next_scale.generate(object(), SCHEDULE, jax.random.key(0), labels=jnp.array([0]))
