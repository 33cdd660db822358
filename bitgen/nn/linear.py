"""The one constructor for projection layers, behind a `kind` switch.

Every model builds its Linear layers through `linear(...)`, so a config can swap the
implementation (`"dense"`, or the quantization-aware `"bitnet"` (ternary b1.58) and `"int8"`
of `bitgen.nn.bitlinear`) without touching model code.
Kernels carry logical axis names (see `bitgen.parallel`) so they shard by the config's rules.
"""

from typing import Literal

from flax import nnx

from bitgen.nn.bitlinear import BitLinear
from bitgen.parallel.axes import with_axes

LinearKind = Literal["dense", "bitnet", "int8"]


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    kind: LinearKind = "dense",
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = (None, None),
    kernel_init=nnx.initializers.lecun_normal(),
    bias_init=nnx.initializers.zeros_init(),
) -> nnx.Module:
  """A layer mapping [..., in_features] -> [..., out_features]; `axes` names (in, out) logically."""
  if kind == "dense":
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, rngs=rngs,
        kernel_init=with_axes(kernel_init, axes), bias_init=with_axes(bias_init, axes[1:]))
  if kind in ("bitnet", "int8"):  # quantization-aware training; `.pack()` gives the inference form
    return BitLinear(
        in_features, out_features, rngs=rngs, use_bias=use_bias,
        weight_quant="ternary_mean" if kind == "bitnet" else "int8",
        kernel_init=with_axes(kernel_init, axes), bias_init=with_axes(bias_init, axes[1:]))
  raise ValueError(f"unknown linear kind {kind!r}; expected one of {LinearKind.__args__}")
