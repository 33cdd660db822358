"""The Infinity transformer training task: BSC targets, official loss, gradients, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bitgen.models import infinity_loss
from bitgen.models.infinity import InfinityConfig
from bitgen.models.infinity_vae import InfinityVAE, InfinityVAEConfig
from bitgen.quantizers import bitwise_self_correction as bsc
from bitgen.train.infinity import InfinityTask

VAE = InfinityVAEConfig(codebook_dim=8, base_channels=32, channel_mult=(1, 1, 1), num_res_blocks=1,
                        patch_size=4)
MODEL = InfinityConfig(embed_dim=64, depth=2, num_heads=2, num_bits=8, text_channels=128,
                       text_maxlen=1, num_classes=3)


@pytest.fixture(scope="module")
def task():
  return InfinityTask(MODEL, InfinityVAE(VAE, rngs=nnx.Rngs(0)))


def batch():
  images = jnp.tanh(jax.random.normal(jax.random.key(0), (4, 16, 16, 3)))
  return {"image": images, "label": jnp.array([0, 1, 2, 0])}


def test_targets_follow_the_self_correction_path(task):
  images = batch()["image"]
  schedule, inputs, labels = task.targets(images, jax.random.key(1))
  assert schedule.grids == ((1, 1), (2, 2), (4, 4))
  assert inputs.shape == (4, 20, 8) and labels.shape == (4, 21, 8)
  clean_inputs, clean_labels = bsc.flip_requant(task.vae.encode_features(images), schedule.grids)
  np.testing.assert_array_equal(np.asarray(labels[:, :1]), np.asarray(clean_labels[:, :1]))
  noisy = [not np.allclose(task.targets(images, jax.random.key(s))[1], clean_inputs) for s in range(4)]
  assert any(noisy)
  clean_task = InfinityTask(MODEL, task.vae, loss={"noise_strength": 0.0})
  np.testing.assert_allclose(clean_task.targets(images, jax.random.key(1))[1], clean_inputs, atol=1e-6)


def test_loss_trains(task):
  model = task.build_model(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  data = batch()

  @nnx.jit
  def step(model, optimizer, i):
    (loss, metrics), grads = nnx.value_and_grad(
        lambda m: task.loss(m, data, step=i, rng=jax.random.key(i)), has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, metrics

  losses = [float(step(model, optimizer, jnp.int32(i))[0]) for i in range(6)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  _, metrics = step(model, optimizer, jnp.int32(9))
  assert 0 <= float(metrics["bit_accuracy"]) <= 1 and float(metrics["bits_per_bit"]) > 0


def test_frequency_baseline():
  from bitgen.models import infinity_schedules
  schedule = infinity_schedules.schedule_for(1.0, "0.06M").prefix(2)
  labels = np.zeros((10, 5, 2), np.uint8)
  labels[:, :, 1] = 1
  freq = infinity_loss.fit_bit_frequencies(labels, schedule)
  np.testing.assert_allclose(freq[0], [1 / 12, 11 / 12])
  assert infinity_loss.baseline_bits_per_bit(freq, labels, schedule) < 0.15
  assert infinity_loss.baseline_bits_per_bit(freq, 1 - labels, schedule) > 3


def test_bad_pairs_raise():
  with pytest.raises(ValueError, match="8 bits per token but the transformer predicts 16"):
    InfinityTask(InfinityConfig(embed_dim=64, depth=1, num_heads=2, num_bits=16, text_channels=128,
                                text_maxlen=1, num_classes=3),
                 nnx.eval_shape(lambda: InfinityVAE(VAE, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match="num_classes"):
    InfinityTask(InfinityConfig(embed_dim=64, depth=1, num_heads=2, num_bits=8, text_channels=128),
                 nnx.eval_shape(lambda: InfinityVAE(VAE, rngs=nnx.Rngs(0))))


@pytest.mark.slow
def test_two_stage_configs_train_with_the_foundation_trainer(tmp_path):
  """configs/infinity.py train_tiny_vae then train_tiny (a few steps, synthetic batches, 8 devices)."""
  from bitgen.train import infinity as infinity_train
  from bitgen.train import trainer
  from configs import infinity as configs

  def data(batch_size):
    rng = np.random.default_rng(0)
    while True:
      yield {"image": np.tanh(rng.normal(size=(batch_size, 32, 32, 3))).astype(np.float32),
             "label": rng.integers(0, configs.NUM_PHOTOS, batch_size).astype(np.int32)}

  quick = dict(batch_size=8, steps=2, warmup_steps=1)
  stage1 = configs.get_config("train_tiny_vae")
  stage1.train.update(quick)
  stage1.log.update(grid_every=0, progress=False)
  stage1.checkpoint.update(every=2, async_save=False)
  trainer.run(stage1, tmp_path / "vae", task=infinity_train.build_task(stage1), train_data=data(8))
  stage2 = configs.get_config("train_tiny")
  stage2.vae_stage = stage1
  stage2.vae_source = str(tmp_path / "vae")
  stage2.train.update(quick)
  stage2.log.update(every=1, grid_every=2, grid_images=2, progress=False)
  stage2.checkpoint.update(every=1000, async_save=False)
  result = trainer.run(stage2, tmp_path / "ar", task=infinity_train.build_task(stage2), train_data=data(8))
  assert np.isfinite(result.history[-1]["loss"]) and "bits_per_bit" in result.history[-1]
  assert any((tmp_path / "ar" / "grids").iterdir())


def test_evaluate_bits_against_the_frequency_baseline(task):
  from bitgen.train.infinity import evaluate_bits
  model = task.build_model(nnx.Rngs(3))
  data = batch()
  result = evaluate_bits(task, model, [data], [data])
  # An untrained model is close to 1 bit per bit; the frequency baseline of the same labels is below 1.
  assert 0.5 < result["bits_per_bit"] < 2.0 and 0.0 < result["baseline_bits_per_bit"] <= 1.0


def test_configs_pair_bits_and_name_unknown_variants():
  from bitgen import configlib
  from bitgen.models.infinity import check_vae_compatible
  from bitgen.models.infinity_vae import InfinityVAEConfig
  from configs import infinity as configs
  for name in [*configs.MODEL_VARIANTS, "train_tiny"]:
    config = configs.get_config(name)
    model = configlib.from_dict(InfinityConfig, config.model)
    check_vae_compatible(configlib.from_dict(InfinityVAEConfig, config.vae).codebook_dim, model)
  stage1 = configs.get_config("train_tiny_vae")
  assert configs.get_config("train_tiny").vae.to_dict() == stage1.model.to_dict()
  with pytest.raises(ValueError, match="unknown Infinity config 'nope'"):
    configs.get_config("nope")
