"""BitLinear: fake quantization, STE gradients, the packed inference form, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bitgen.nn.bitlinear import (BitLinear, PackedBitLinear, pack_bitlinears, quantize_activations,
                                 quantize_weights)
from bitgen.nn.linear import linear
from bitgen.nn.transformer import BlockConfig, Transformer
from bitgen.parallel.axes import LOGICAL_AXES


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_activations_absmax_per_token(bits):
  x = jax.random.normal(jax.random.key(0), (3, 4, 64)) * jnp.arange(1, 5)[:, None]
  q, scale = quantize_activations(x, bits)
  q_max = 2 ** (bits - 1) - 1
  assert q.dtype == jnp.int8 and scale.shape == (3, 4)
  np.testing.assert_array_equal(jnp.max(jnp.abs(q), axis=-1), q_max)  # each token's absmax hits Q
  np.testing.assert_allclose(scale, jnp.max(jnp.abs(x), axis=-1) / q_max, rtol=1e-6)
  assert float(jnp.max(jnp.abs(q * scale[..., None] - x) - scale[..., None] / 2)) <= 1e-6
  with pytest.raises(ValueError, match="activation bits"):
    quantize_activations(x, 9)


def test_quantize_weights_scales():
  w = jax.random.normal(jax.random.key(1), (32, 16))
  for kind, gamma in (("ternary_mean", jnp.mean(jnp.abs(w))), ("ternary_median", jnp.median(jnp.abs(w)))):
    q, scale = quantize_weights(w, kind)
    np.testing.assert_allclose(scale, gamma, rtol=1e-6)
    np.testing.assert_array_equal(q, jnp.clip(jnp.round(w / gamma), -1, 1))
  q, scale = quantize_weights(w, "int8")
  assert scale.shape == (16,)
  np.testing.assert_array_equal(jnp.max(jnp.abs(q), axis=0), 127)
  with pytest.raises(ValueError, match="unknown weight quantization"):
    quantize_weights(w, "binary")


@pytest.mark.parametrize("weight_quant", ["ternary_mean", "ternary_median", "int8"])
def test_forward_and_gradients_follow_the_ste_definition(weight_quant):
  layer = BitLinear(32, 8, rngs=nnx.Rngs(0), weight_quant=weight_quant, activation_bits=6,
                    bias_init=nnx.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(2), (5, 32))
  g = jax.random.normal(jax.random.key(3), (5, 8))  # upstream gradient: loss = sum(g * y)
  kernel = layer.kernel[...]
  x_q, x_scale = quantize_activations(x, 6)
  w_q, w_scale = quantize_weights(kernel, weight_quant)
  x_fake, w_fake = x_q * x_scale[:, None], w_q * w_scale

  np.testing.assert_allclose(layer(x), x_fake @ w_fake + layer.bias[...], rtol=1e-5, atol=1e-5)

  def loss(model, x):
    return jnp.sum(g * model(x))

  grads, grad_x = nnx.grad(loss, argnums=(0, 1))(layer, x)
  # Straight-through: dL/dx = g W~^T, dL/dW = x~^T g, dL/db = sum g.
  np.testing.assert_allclose(grad_x, g @ w_fake.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads.kernel[...], x_fake.T @ g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads.bias[...], jnp.sum(g, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_quant,implementation", [
    ("ternary_mean", "reference"), ("ternary_median", "reference"), ("int8", "reference"),
    ("int8", "gpu"), ("ternary_mean", "gpu")])
def test_pack_matches_training_forward(weight_quant, implementation):
  layer = BitLinear(512, 64, rngs=nnx.Rngs(4), weight_quant=weight_quant,
                    bias_init=nnx.initializers.normal(1.0))
  packed = layer.pack(implementation=implementation)
  assert isinstance(packed, PackedBitLinear)
  expected_dtype = jnp.int8 if weight_quant == "int8" else jnp.uint32
  assert packed.weight[...].dtype == expected_dtype
  x = jax.random.normal(jax.random.key(5), (2, 3, 512))
  if implementation == "gpu":  # the Triton kernel, run by the Pallas interpreter on CPU
    from bitgen.kernels import quantized_matmul as qmm
    x_q, x_scale = quantize_activations(x)
    y = qmm.quantized_matmul(x_q, packed.weight[...], (x_scale, packed.weight_scale[...]),
                             out_dtype=jnp.float32, implementation="gpu", interpret=True) + packed.bias[...]
  else:
    y = packed(x)
  np.testing.assert_allclose(y, layer(x), rtol=1e-5, atol=1e-4)


def test_pack_rejects_unpackable_width():
  with pytest.raises(ValueError, match="multiple of 16"):
    BitLinear(24, 8, rngs=nnx.Rngs(0)).pack()


def test_linear_kinds_build_bitlinear_with_axes():
  for kind, weight_quant in (("bitnet", "ternary_mean"), ("int8", "int8")):
    layer = linear(32, 16, rngs=nnx.Rngs(0), kind=kind, axes=("embed", "mlp"))
    assert isinstance(layer, BitLinear) and layer.weight_quant == weight_quant
    assert layer.kernel.get_metadata()[LOGICAL_AXES] == ("embed", "mlp")
    assert layer.pack().weight.get_metadata()[LOGICAL_AXES] == ("mlp", "embed")


def test_tiny_bitlinear_mlp_learns():
  # Regression of a smooth function of 16 inputs by BitLinear -> gelu -> BitLinear.
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = BitLinear(16, 64, rngs=rngs, weight_quant="ternary_median")
      self.fc2 = BitLinear(64, 1, rngs=rngs, weight_quant="ternary_median")

    def __call__(self, x):
      return self.fc2(jax.nn.gelu(self.fc1(x)))[..., 0]

  x = jax.random.normal(jax.random.key(6), (256, 16))
  y = jnp.sin(x[:, 0]) + x[:, 1] * x[:, 2] - 0.5 * x[:, 3]
  model = Mlp(nnx.Rngs(7))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(300)]
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_transformer_with_bitnet_linears_trains_and_packs():
  model = Transformer(BlockConfig(width=64, heads=4, linear="bitnet"), depth=1, rngs=nnx.Rngs(8))
  x = jax.random.normal(jax.random.key(9), (2, 5, 64))
  grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  y_train = model(x)
  assert pack_bitlinears(model, implementation="reference") == 6  # q, k, v, out, up, down
  assert not any(isinstance(m, BitLinear) for _, m in nnx.iter_graph(model))
  np.testing.assert_allclose(model(x), y_train, rtol=1e-4, atol=1e-4)
