"""BLD training tasks: finite gradients, decreasing losses, sampled AE bits, the bits iterator,
and train_bld + sample_grid end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fixtures
from bitgen.models import bld_autoencoder, bld_denoiser
from bitgen.train import bld as bld_train
from bitgen.train import run
from configs import bld as bld_configs

# No downsampling and one res block: the smallest graph, so the gradient compiles quickly.
AE = dict(image_size=8, in_channels=3, base_channels=32, channel_mult=(1,), num_res_blocks=1,
          attn_resolutions=(), emb_dim=32, num_bits=8, decoder_res_mult=1.0, norm_first=True,
          code_weight=0.0)
DENOISER = dict(num_bits=8, latent_size=8, width=32, heads=2, depth=1, num_classes=3,
                time_scale_steps=8)
DIFFUSION = dict(total_steps=8, beta_type="linear", p_flip=True, loss_type="balanced",
                 focal_gamma=0.0, loss_final="mean")


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
  """Low-frequency colour patterns in [-1, 1] (learnable in a few steps, unlike noise)."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(0, np.pi, AE["image_size"])
  phase = rng.uniform(0, 2 * np.pi, (count, 1, 1, 3))
  return np.sin(grid[None, :, None, None] + grid[None, None, :, None] + phase).astype(np.float32)


def train_config(steps: int, batch_size: int, lr: float):
  return {"train": {"batch_size": batch_size, "steps": steps, "lr": lr, "warmup_steps": 0,
                    "ema_decay": None, "weight_decay": 0.0},
          "mesh": {"devices": 1}, "checkpoint": {"every": 1000, "async_save": False},
          "log": {"every": 1, "grid_every": 0, "progress": False}}


def repeat(batch):
  while True:
    yield batch


def test_autoencoder_task_trains_and_samples_its_bits(tmp_path):
  task = bld_train.AutoencoderTask(AE)
  images = smooth_images(8)
  batch = {"image": jnp.asarray(images)}

  @nnx.jit
  def check(model):
    loss = lambda m, key: task.loss(m, batch, step=0, rng=key)[0]
    keys = jax.random.key(1), jax.random.key(1), jax.random.key(2)
    grads = nnx.grad(loss)(model, keys[0])
    thresholded = model.decode(model.encode(batch["image"]))
    return ([loss(model, k) for k in keys], nnx.state(grads.encoder),
            task.visualize(model, batch)["outputs"], thresholded)

  losses, encoder_grads, shown, thresholded = check(task.build_model(nnx.Rngs(0)))
  # Training draws the bits ~ Bernoulli(p) from the step's key; the grid shows the thresholded bits.
  assert losses[0] == losses[1] != losses[2]
  np.testing.assert_allclose(shown, thresholded, atol=1e-5)
  # The straight-through estimator carries gradients into the encoder.
  encoder_grads = jax.tree.leaves(encoder_grads)
  assert all(np.isfinite(g).all() for g in encoder_grads)
  assert any(np.abs(g).max() > 0 for g in encoder_grads)

  result = run({"model": AE, **train_config(6, 8, 2e-3)}, tmp_path, task=task,
               train_data=repeat({"image": images}))
  losses = [h["loss"] for h in result.history]
  assert all(np.isfinite([h["loss"] for h in result.history] + [h["grad_norm"] for h in result.history]))
  assert losses[-1] < 0.8 * losses[0]
  assert {"l1", "quantizer/codebook_loss"} <= set(result.history[0])


def class_bits(labels: np.ndarray) -> np.ndarray:
  """Bits that depend only on the label: a fixed random pattern per class."""
  patterns = np.random.default_rng(0).integers(0, 2, (3, 64, 8), dtype=np.uint8)
  return patterns[labels]


def test_prior_task_trains(tmp_path):
  task = bld_train.PriorTask(DENOISER, DIFFUSION, label_dropout=0.1)
  labels = np.arange(32, dtype=np.int32) % 3
  batch = {"bits": class_bits(labels), "label": labels}
  result = run({"model": DENOISER, **train_config(16, 32, 3e-3)}, tmp_path, task=task,
               train_data=repeat(batch))
  history = [(h["loss"], h["grad_norm"]) for h in result.history]
  assert np.isfinite(history).all()

  @nnx.jit
  def mean_loss(model):
    # The same draws of t, x_t and label dropout for both models: only the weights differ.
    keys = jax.random.split(jax.random.key(7), 16)
    return jnp.mean(jnp.stack([task.loss(model, batch, step=0, rng=k)[0] for k in keys]))

  before = mean_loss(task.build_model(nnx.Rngs(0)))
  after = mean_loss(bld_train.on_one_device(result.model()))
  assert after < 0.95 * before
  with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
    task.loss(result.model(), {"bits": batch["bits"]}, step=0, rng=jax.random.key(0))


def test_encoded_bits_iterator_resumes_and_thresholds():
  autoencoder = bld_autoencoder.BinaryAutoencoder(bld_autoencoder.Config(**AE), rngs=nnx.Rngs(0))

  class Images:
    """A checkpointable stream of distinct image batches."""

    def __init__(self):
      self.index = 0

    def __next__(self):
      self.index += 1
      return {"image": smooth_images(2, seed=self.index), "label": np.array([0, 1], np.int32)}

    def get_state(self):
      return {"index": self.index}

    def set_state(self, state):
      self.index = state["index"]

  first = bld_train.EncodedBits(Images(), autoencoder, ae_bits="sample", seed=3)
  next(first)
  state = first.get_state()
  expected = next(first)
  assert expected["bits"].shape == (2, 64, 8) and expected["bits"].dtype == np.uint8
  np.testing.assert_array_equal(expected["label"], [0, 1])
  resumed = bld_train.EncodedBits(Images(), autoencoder, ae_bits="sample", seed=3)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["bits"], expected["bits"])

  thresholded = next(bld_train.EncodedBits(Images(), autoencoder, ae_bits="threshold", seed=3))
  direct = autoencoder.encode(jnp.asarray(smooth_images(2, seed=1)))
  np.testing.assert_array_equal(thresholded["bits"], np.asarray(direct).reshape(2, 64, 8))
  with pytest.raises(ValueError, match="ae_bits must be one of"):
    bld_train.EncodedBits(Images(), autoencoder, ae_bits="mean", seed=0)


def test_bad_prior_options():
  config = bld_configs.get_config("photos_prior")
  config.prior.ae_bits = "soft"
  with pytest.raises(ValueError, match="ae_bits must be one of"):
    bld_train.prior_options(config)
  config = bld_configs.get_config("photos_prior")
  config.prior.label_drop = 0.2
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['label_drop'\] in config.prior"):
    bld_train.prior_options(config)


def tiny_photos_configs(steps: int):
  """configs/bld.py photos_ae / photos_prior shrunk to 8^2 crops and a few steps."""
  data = {**fixtures.data_config(fixtures.photos_dir()), "image_size": AE["image_size"],
          "eval_grid": 1}
  ae, prior = bld_configs.get_config("photos_ae"), bld_configs.get_config("photos_prior")
  for config, batch in ((ae, 4), (prior, 8)):
    config.data = data
    config.train.update(steps=steps, batch_size=batch, warmup_steps=0)
    config.autoencoder = AE
  ae.model = AE
  prior.model = {**DENOISER, "num_classes": 10}
  prior.diffusion = DIFFUSION
  return ae, prior


@pytest.mark.slow
def test_train_bld_then_sample_grid(tmp_path):
  ae, prior = tiny_photos_configs(steps=2)
  report = bld_train.train_bld(ae, prior, tmp_path, eval_batch_size=4)
  assert report == json.loads((tmp_path / "report.json").read_text())
  assert report["autoencoder"]["steps"] == 2 and report["prior"]["steps"] == 2
  assert np.isfinite(report["autoencoder"]["psnr"])
  prior_report = report["prior"]
  assert prior_report["bits_per_image"] == 64 * 8
  assert 0 < prior_report["baseline_entropy"] <= 1
  assert 0 <= prior_report["held_out"]["encoder_bit_entropy"] <= 1  # photos_prior samples its bits
  for bound in (prior_report["held_out"]["nll_bound"],
                prior_report["train_photos_fresh_crops"]["nll_bound_conditional"]):
    assert set(bound) == {"marginal", "sampler"} and all(v > 0 for v in bound.values())

  path = bld_train.sample_grid(ae, prior, tmp_path, tmp_path / "grid.png", batch=3, steps=3, columns=3)
  assert np.asarray(Image.open(path)).shape == (8, 24, 3)
  with pytest.raises(ValueError, match=r"sampling steps \(9\) exceed the 8"):
    bld_train.sample_grid(ae, prior, tmp_path, tmp_path / "x.png", batch=1, steps=9)


def test_train_bld_rejects_mismatched_configs(tmp_path):
  ae, prior = tiny_photos_configs(steps=1)
  prior.autoencoder = {**AE, "num_bits": 16}
  with pytest.raises(ValueError, match="prior must be trained on the bits of the autoencoder"):
    bld_train.train_bld(ae, prior, tmp_path)
  with pytest.raises(ValueError, match="task 'bld_autoencoder'"):
    bld_train.train_bld(prior, prior, tmp_path)


def test_trainer_builds_the_bld_tasks():
  from bitgen.train import build_task
  from bitgen.train import config as config_lib
  ae, prior = (config_lib.with_defaults(bld_configs.get_config(name))
               for name in ("photos_ae", "photos_prior"))
  assert isinstance(build_task(ae), bld_train.AutoencoderTask)
  task = build_task(prior)
  assert isinstance(task, bld_train.PriorTask) and task.label_dropout == 0.1
  assert task.schedule.total_steps == 64 and task.conditional
  with pytest.raises(ValueError, match=r"trains on autoencoder bits \(batch\['bits'\]\)"):
    task.loss(None, {"image": np.zeros((1, 32, 32, 3), np.float32)}, step=0, rng=jax.random.key(0))
