"""The StyleGAN discriminator (shapes, axes, resampling, minibatch stddev) and the GAN loss math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitgen.models import stylegan_discriminator as sd
from bitgen.parallel.axes import LOGICAL_AXES
from bitgen.train import gan
from bitgen.train.tokenizer import loss_config


def _tiny(size: int) -> sd.Config:
  return sd.Config(image_size=size, channel_base=8 * size, channel_max=16)


@pytest.mark.parametrize("size", [16, 64])
def test_discriminator_shapes_and_axes(size):
  config = _tiny(size)
  model = sd.StyleGANDiscriminator(config, rngs=nnx.Rngs(0))
  assert len(model.blocks) == int(math.log2(size)) - 2  # S, S/2, ..., 8
  logits = model(jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)),
                             jnp.float32))
  assert logits.shape == (4, 1) and bool(jnp.all(jnp.isfinite(logits)))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves
  for variable in leaves:
    names = variable.get_metadata().get(LOGICAL_AXES)
    assert names is not None and len(names) == variable.get_value().ndim
  # Equalised lr: weights stored N(0, 1).
  kernel = model.blocks[0].conv0.kernel.get_value()
  assert 0.8 < float(jnp.std(kernel)) < 1.2


def test_discriminator_official_size_at_256():
  config = sd.Config(image_size=256)
  assert [config.width(r) for r in config.block_resolutions] == [128, 256, 512, 512, 512, 512]
  model = nnx.eval_shape(lambda: sd.StyleGANDiscriminator(config, rngs=nnx.Rngs(0)))
  out = jax.eval_shape(lambda x: sd.StyleGANDiscriminator(config, rngs=nnx.Rngs(0))(x),
                       jax.ShapeDtypeStruct((4, 256, 256, 3), jnp.float32))
  assert out.shape == (4, 1)
  # fc of the epilogue maps the channel-major 512 x 4 x 4 features to 512.
  assert model.epilogue.fc.kernel.get_value().shape == (512 * 16, 512)


def test_discriminator_rejects_bad_input():
  model = sd.StyleGANDiscriminator(_tiny(16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\].*\(2, 3, 16, 16\)"):
    model(jnp.zeros((2, 3, 16, 16)))
  with pytest.raises(ValueError, match="power-of-two image_size"):
    sd.Config(image_size=24)
  with pytest.raises(ValueError, match="not divisible by the group size"):
    model(jnp.zeros((6, 16, 16, 3)))


def _correlate(x, w, stride=1):
  """Valid cross-correlation, x [H, W, Ci], w [k, k, Ci, Co] -> [H', W', Co] (loops, float64)."""
  k = w.shape[0]
  h = (x.shape[0] - k) // stride + 1
  out = np.zeros((h, (x.shape[1] - k) // stride + 1, w.shape[3]))
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      patch = x[i * stride:i * stride + k, j * stride:j * stride + k]
      out[i, j] = np.einsum("abc,abcd->d", patch, w)
  return out


def _blur_reference(x, pad):
  """upfirdn2d with the [1,3,3,1] filter: zero-pad, then correlate each channel with the filter."""
  f = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
  x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  c = x.shape[-1]
  return _correlate(x, np.einsum("ab,cd->abcd", f, np.eye(c)))


def test_downsampling_convs_follow_stylegan_padding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 8, 8, 2))
  conv3 = sd.EqualizedConv(2, 3, 3, rngs=nnx.Rngs(0), down=2)
  conv3.bias.set_value(jnp.asarray(rng.normal(size=3), jnp.float32))
  conv1 = sd.EqualizedConv(2, 3, 1, rngs=nnx.Rngs(1), down=2, bias=False)
  w3 = np.asarray(conv3.kernel.get_value(), np.float64) / math.sqrt(2 * 9)
  w1 = np.asarray(conv1.kernel.get_value(), np.float64) / math.sqrt(2)
  # conv2d_resample, k=3, down=2, padding 1: pad 2 per side, filter, stride-2 valid conv.
  expected3 = _correlate(_blur_reference(x[0], 2), w3, stride=2) + np.asarray(conv3.bias.get_value())
  # k=1, down=2: downsample2d (pad 1 per side, filter, keep every other pixel), then the 1x1 conv.
  expected1 = _correlate(_blur_reference(x[0], 1)[::2, ::2], w1)
  got3, got1 = conv3(jnp.asarray(x, jnp.float32)), conv1(jnp.asarray(x, jnp.float32))
  assert got3.shape == got1.shape == (1, 4, 4, 3)
  np.testing.assert_allclose(np.asarray(got3[0]), expected3, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got1[0]), expected1, rtol=1e-5, atol=1e-5)


def test_minibatch_stddev_matches_the_official_grouping():
  x = np.random.default_rng(0).normal(size=(8, 3, 3, 4))
  out = np.asarray(sd.minibatch_stddev(jnp.asarray(x, jnp.float32), group_size=4, channels=2))
  assert out.shape == (8, 3, 3, 6)
  np.testing.assert_allclose(out[..., :4], x, rtol=1e-6)
  n = 8 // 4
  for i in range(8):
    members = x[i % n::n]  # official reshape(G, -1, ...): image i is in group i mod n
    for f in range(2):
      channels = members[..., 2 * f:2 * f + 2]
      expected = np.mean(np.sqrt(np.var(channels, axis=0) + 1e-8))
      np.testing.assert_allclose(out[i, :, :, 4 + f], expected, rtol=1e-5)


def _softplus(x):
  return np.log1p(np.exp(x))


def test_gan_losses_match_their_definitions():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(6, 1)), rng.normal(size=(6, 1))
  jr, jf = jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32)
  np.testing.assert_allclose(float(gan.generator_loss(jf, "vanilla")),
                             np.mean(_softplus(-fake)), rtol=1e-5)
  np.testing.assert_allclose(float(gan.generator_loss(jf, "hinge")), -np.mean(fake), rtol=1e-5)
  np.testing.assert_allclose(
      float(gan.discriminator_loss(jr, jf, "vanilla")),
      0.5 * (np.mean(_softplus(-real)) + np.mean(_softplus(fake))), rtol=1e-5)
  np.testing.assert_allclose(
      float(gan.discriminator_loss(jr, jf, "hinge")),
      0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake))), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown GAN loss 'wgan'"):
    gan.generator_loss(jf, "wgan")
  assert [float(gan.disc_factor(s, 3)) for s in (0, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]


def test_adaptive_weight_and_r1():
  a, b = jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 1.0]])
  np.testing.assert_allclose(float(gan.adaptive_weight(a, b, 0.1)), 0.1 * 5.0 / (1.0 + 1e-4),
                             rtol=1e-6)
  assert float(gan.adaptive_weight(a, jnp.zeros_like(b), 1.0)) == pytest.approx(1e4)  # clipped
  assert float(jax.grad(lambda g: gan.adaptive_weight(a, g, 1.0))(b).sum()) == 0.0  # not differentiated
  # R1 of a linear critic D(x) = <w, x>: the input gradient is w for every image.
  w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 3)), jnp.float32)
  critic = lambda w, x: jnp.einsum("bhwc,hwc->b", x, w)[:, None]
  images = jnp.ones((5, 2, 2, 3))
  np.testing.assert_allclose(float(gan.r1_penalty(lambda x: critic(w, x), images)),
                             float(jnp.sum(w ** 2)), rtol=1e-5)
  # ... and it is differentiable in the critic's weights: d sum(w^2) / dw = 2w.
  grad = jax.grad(lambda w: gan.r1_penalty(lambda x: critic(w, x), images))(w)
  np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(w), rtol=1e-5)


def test_gan_config_errors():
  assert loss_config({})["gan_weight"] == 0.0  # off by default
  with pytest.raises(ValueError, match="gan_loss='wgan'"):
    loss_config({"gan_loss": "wgan"})
  with pytest.raises(ValueError, match="gan_start"):
    loss_config({"gan_weight": 0.1, "gan_start": -1})
  with pytest.raises(ValueError, match="gan_r1_every"):
    loss_config({"gan_r1_every": 0})
