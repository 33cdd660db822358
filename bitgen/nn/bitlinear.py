"""BitLinear: quantization-aware training of projections (BitNet b1.58, int8), and their packed form.

Training (`BitLinear`) fake-quantizes both operands and passes gradients straight through (STE):
- weights, "ternary_mean" (BitNet b1.58): gamma = mean|W|, W~ = RoundClip(W / gamma, -1, 1) * gamma;
  "ternary_median" ("BitNet b1.58 Reloaded", better for small models): gamma = median|W|;
  "int8": per output channel absmax, W~ = RoundClip(W / s, -127, 127) * s with s = max|W| / 127;
- activations: per token absmax to `activation_bits` (default 8) signed integers, Q = 2^(b-1) - 1,
  x~ = RoundClip(x / s, -Q, Q) * s with s = max|x| / Q.
Forward uses x~ @ W~; backward treats both roundings as the identity (dy/dx = W~^T, dy/dW = x~^T).

`BitLinear.pack()` returns a `PackedBitLinear`: integer weights (ternary packed 16 to a uint32 word,
see `bitgen.kernels.ternary_pack`) and their scales, running on `quantized_matmul`; it computes the
same function as the training forward up to float rounding of the scales.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bitgen.kernels import quantized_matmul as qmm
from bitgen.kernels import ternary_pack
from bitgen.parallel.axes import LOGICAL_AXES

WeightQuant = Literal["ternary_mean", "ternary_median", "int8"]
EPS = 1e-5


def quantize_activations(x: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
  """Per-token absmax: (..., K) float -> (int8 (..., K) in [-Q, Q], float32 scale (...,)), x ~ q * s."""
  if not 2 <= bits <= 8:
    raise ValueError(f"activation bits must be in 2..8 (int8 storage), got {bits}")
  q_max = 2 ** (bits - 1) - 1
  x = x.astype(jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), EPS) / q_max  # [...]
  q = jnp.clip(jnp.round(x / scale[..., None]), -q_max, q_max)
  return q.astype(jnp.int8), scale


def quantize_weights(kernel: jax.Array, kind: WeightQuant) -> tuple[jax.Array, jax.Array]:
  """(in, out) float -> (int8 (in, out), float32 scale: () for ternary, (out,) for int8)."""
  w = kernel.astype(jnp.float32)
  if kind in ("ternary_mean", "ternary_median"):
    reduce = jnp.mean if kind == "ternary_mean" else jnp.median
    scale = jnp.maximum(reduce(jnp.abs(w)), EPS)
    return jnp.clip(jnp.round(w / scale), -1, 1).astype(jnp.int8), scale
  if kind == "int8":
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=0), EPS) / 127  # [out]
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
  raise ValueError(f"unknown weight quantization {kind!r}; expected one of {WeightQuant.__args__}")


def _straight_through(x: jax.Array, x_quantized: jax.Array) -> jax.Array:
  """Forward: x_quantized; backward: identity to x."""
  return x + jax.lax.stop_gradient(x_quantized - x)


def _output_dtype(x: jax.Array):
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


class PackedWeight(nnx.Variable):
  """Frozen integer weights (and their scales) of an inference-form layer; not trained."""


class BitLinear(nnx.Module):
  """[..., in] -> [..., out] with fake-quantized weights and activations (QAT, STE gradients).

  Parameters are named and laid out as `nnx.Linear`'s (`kernel` (in, out), `bias` (out,)), so
  checkpoints and sharding rules carry over between `kind="dense"` and the quantized kinds.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               weight_quant: WeightQuant = "ternary_mean", activation_bits: int = 8,
               use_bias: bool = True, kernel_init=nnx.initializers.lecun_normal(),
               bias_init=nnx.initializers.zeros_init()):
    if weight_quant not in WeightQuant.__args__:
      raise ValueError(f"unknown weight quantization {weight_quant!r}; expected one of {WeightQuant.__args__}")
    if not 2 <= activation_bits <= 8:
      raise ValueError(f"activation bits must be in 2..8 (int8 storage), got {activation_bits}")
    self.in_features, self.out_features = in_features, out_features
    self.weight_quant, self.activation_bits = weight_quant, activation_bits
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"BitLinear expects [..., {self.in_features}], got {x.shape}")
    kernel = self.kernel[...]
    x_q, x_scale = quantize_activations(x, self.activation_bits)
    w_q, w_scale = quantize_weights(kernel, self.weight_quant)
    x_fake = _straight_through(x.astype(jnp.float32), x_q * x_scale[..., None])
    w_fake = _straight_through(kernel.astype(jnp.float32), w_q * w_scale)
    y = x_fake @ w_fake  # [..., out]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(_output_dtype(x))

  def pack(self, implementation: qmm.Implementation = "auto") -> "PackedBitLinear":
    """The inference form: integer weights on `quantized_matmul` (ternary packed 16 per uint32)."""
    w_q, w_scale = quantize_weights(self.kernel[...], self.weight_quant)
    w_nk = w_q.T  # [out, in]: K-major rows
    if self.weight_quant != "int8":
      if self.in_features % ternary_pack.VALUES_PER_WORD:
        raise ValueError(f"packing ternary weights needs in_features a multiple of "
                         f"{ternary_pack.VALUES_PER_WORD}, got {self.in_features}")
      w_nk = ternary_pack.pack_ternary(w_nk)
    in_axis, out_axis = self.kernel.get_metadata().get(LOGICAL_AXES, (None, None))
    bias = None if self.bias is None else self.bias[...]
    return PackedBitLinear(w_nk, w_scale, bias, activation_bits=self.activation_bits,
                           axes=(in_axis, out_axis), implementation=implementation)


class PackedBitLinear(nnx.Module):
  """Inference form of `BitLinear`: quantize activations per token, then `quantized_matmul`."""

  def __init__(self, weight: jax.Array, weight_scale: jax.Array, bias: jax.Array | None, *,
               activation_bits: int = 8, axes: tuple[str | None, str | None] = (None, None),
               implementation: qmm.Implementation = "auto"):
    # weight [out, in] int8 or [out, in // 16] uint32, logically (out, in).
    self.weight = PackedWeight(weight, **{LOGICAL_AXES: (axes[1], axes[0])})
    self.weight_scale = PackedWeight(weight_scale)
    self.bias = None if bias is None else nnx.Param(bias, **{LOGICAL_AXES: (axes[1],)})
    self.activation_bits, self.implementation = activation_bits, implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    x_q, x_scale = quantize_activations(x, self.activation_bits)
    y = qmm.quantized_matmul(x_q, self.weight[...], (x_scale, self.weight_scale[...]),
                             out_dtype=jnp.float32, implementation=self.implementation)
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(_output_dtype(x))


def pack_bitlinears(model: nnx.Module, implementation: qmm.Implementation = "auto") -> int:
  """Replaces every `BitLinear` inside `model` by its `pack()`ed form, in place; returns how many."""
  found = [(path, layer) for path, layer in nnx.iter_graph(model) if isinstance(layer, BitLinear)]
  for path, layer in found:
    if not path:
      raise ValueError("pack_bitlinears replaces layers inside a model; call .pack() on a BitLinear itself")
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    packed = layer.pack(implementation)
    if isinstance(path[-1], int):
      parent[path[-1]] = packed
    else:
      setattr(parent, path[-1], packed)
  return len(found)
