"""Official BSQ-ViT (`VITBSQModel`) state dict <-> `bitgen.models.bsq_vit.BSQViT` parameters.

Name map (official -> ours); PyTorch Linear weights are (out, in), ours (in, out):

  {enc,dec}oder.positional_embedding              -> {enc,dec}oder.position_embedding
  encoder.conv1.weight                            -> encoder.patch_embed.kernel (transposed)
  {enc,dec}oder.ln_{pre,post}.{weight,bias}       -> ....ln_{pre,post}.{scale,bias}
  *.transformer.resblocks.i.ln_{1,2}              -> *.transformer.blocks.i.ln_{1,2}
  *.transformer.resblocks.i.attn.in_proj_*        -> *.transformer.blocks.i.attn.{query,key,value}
                                                     (rows [W_q; W_k; W_v] of the fused (3W, W))
  *.transformer.resblocks.i.attn.out_proj         -> *.transformer.blocks.i.attn.out
  *.transformer.resblocks.i.mlp.{c_fc,c_proj}     -> *.transformer.blocks.i.mlp.{up,down}
  decoder.ffn.0 / decoder.conv_out                -> decoder.ffn / decoder.to_pixels
  quant_embed / post_quant_embed                  -> quant_embed / post_quant_embed
  quantize.basis, quantize.group_basis            -> checked against the config's quantizer, not stored

The conversion is lossless (a copy, transpose or row slice of each array; lower-precision floats
are widened to float32 exactly). Missing, unexpected or mis-shaped keys raise `CheckpointError`
naming them.
"""

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen import quantizers
from bitgen.convert.checkpoint_io import CheckpointError, load_state_dict
from bitgen.models.bsq_vit import BSQViT, Config

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one of our parameters lives in the official state dict."""

  official: str
  ours: Path
  transpose: bool = False  # PyTorch (out, in) <-> ours (in, out)
  part: int | None = None  # index of this piece along axis 0 of a fused official array (q, k, v)
  parts: int = 1


def _linear(official: str, ours: Path, *, bias: bool = True) -> list[Slot]:
  slots = [Slot(f"{official}.weight", (*ours, "kernel"), transpose=True)]
  return slots + ([Slot(f"{official}.bias", (*ours, "bias"))] if bias else [])


def _norm(official: str, ours: Path) -> list[Slot]:
  return [Slot(f"{official}.weight", (*ours, "scale")), Slot(f"{official}.bias", (*ours, "bias"))]


def _transformer(official: str, ours: Path, depth: int) -> list[Slot]:
  slots = []
  for i in range(depth):
    src, dst = f"{official}.resblocks.{i}", (*ours, "blocks", i)
    for part, name in enumerate(("query", "key", "value")):
      slots += [Slot(f"{src}.attn.in_proj_weight", (*dst, "attn", name, "kernel"), True, part, 3),
                Slot(f"{src}.attn.in_proj_bias", (*dst, "attn", name, "bias"), False, part, 3)]
    slots += _linear(f"{src}.attn.out_proj", (*dst, "attn", "out"))
    slots += _norm(f"{src}.ln_1", (*dst, "ln_1")) + _norm(f"{src}.ln_2", (*dst, "ln_2"))
    slots += _linear(f"{src}.mlp.c_fc", (*dst, "mlp", "up"))
    slots += _linear(f"{src}.mlp.c_proj", (*dst, "mlp", "down"))
  return slots


def param_slots(config: Config) -> list[Slot]:
  """Every parameter of `BSQViT(config)` and its source in the official state dict."""
  slots = [Slot("encoder.positional_embedding", ("encoder", "position_embedding"))]
  slots += _linear("encoder.conv1", ("encoder", "patch_embed"), bias=False)
  slots += _norm("encoder.ln_pre", ("encoder", "ln_pre"))
  slots += _transformer("encoder.transformer", ("encoder", "transformer"), config.depth)
  slots += _norm("encoder.ln_post", ("encoder", "ln_post"))
  slots += _linear("quant_embed", ("quant_embed",))
  slots += _linear("post_quant_embed", ("post_quant_embed",))
  slots += [Slot("decoder.positional_embedding", ("decoder", "position_embedding"))]
  slots += _norm("decoder.ln_pre", ("decoder", "ln_pre"))
  slots += _transformer("decoder.transformer", ("decoder", "transformer"), config.depth)
  slots += _norm("decoder.ln_post", ("decoder", "ln_post"))
  slots += _linear("decoder.ffn.0", ("decoder", "ffn"))
  slots += _linear("decoder.conv_out", ("decoder", "to_pixels"))
  return slots


# Quantizer buffers of the official model: checked, not converted (`group_codebook` is
# non-persistent but older checkpoints may hold it).
QUANTIZER_BUFFERS = ("quantize.basis", "quantize.group_basis", "quantize.group_codebook")


def _official_shape(slot_shapes: list[tuple[Slot, tuple[int, ...]]]) -> tuple[int, ...]:
  slot, shape = slot_shapes[0]
  shape = shape[::-1] if slot.transpose else shape
  return (shape[0] * slot.parts, *shape[1:])


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: BSQViT) -> nnx.State:
  """Official state dict -> an `nnx.State` of `model`'s parameters (apply with `nnx.update`)."""
  config = model.config
  ours = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  slots = param_slots(config)
  if set(ours) != {s.ours for s in slots}:  # the name map and the model must describe the same tree
    raise AssertionError(f"BSQ-ViT name map out of date: {sorted(set(ours) ^ {s.ours for s in slots})}")
  by_key: dict[str, list[tuple[Slot, tuple[int, ...]]]] = {}
  for slot in slots:
    by_key.setdefault(slot.official, []).append((slot, tuple(ours[slot.ours].shape)))

  names = set(state_dict)
  missing = sorted(set(by_key) - names)
  unexpected = sorted(names - set(by_key) - set(QUANTIZER_BUFFERS))
  if missing and not names & set(by_key):
    raise CheckpointError(
        "this is not an official BSQ-ViT (VITBSQModel) state dict: none of its "
        f"{len(by_key)} parameter names are present (e.g. {missing[0]!r}); it has {sorted(names)[:5]}...")
  if missing or unexpected:
    raise CheckpointError(
        f"BSQ-ViT checkpoint does not match the config (depth={config.depth}): "
        + (f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
        + ("; " if missing and unexpected else "")
        + (f"unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else ""))
  wrong = []
  for key, slot_shapes in by_key.items():
    expected, array = _official_shape(slot_shapes), state_dict[key]
    if tuple(array.shape) != expected:
      wrong.append(f"{key!r} has shape {tuple(array.shape)}, the config needs {expected}")
    elif not np.issubdtype(array.dtype, np.floating):
      wrong.append(f"{key!r} has dtype {array.dtype}, expected floating point")
  if wrong:
    raise CheckpointError("BSQ-ViT checkpoint does not match the config: " + "; ".join(wrong))
  _check_quantizer_buffers(state_dict, model)

  flat = {}
  for slot in slots:
    array = np.asarray(state_dict[slot.official])
    if slot.parts > 1:
      array = np.split(array, slot.parts, axis=0)[slot.part]
    if slot.transpose:
      array = array.T
    flat[slot.ours] = jnp.asarray(array, dtype=ours[slot.ours].dtype)
  return nnx.from_flat_state(flat)


def state_to_official(state: nnx.State, config: Config) -> dict[str, np.ndarray]:
  """A State shaped like `BSQViT(config)`'s parameters (weights, or their gradients) -> official
  names and layouts (the inverse of `convert_state_dict`, without the quantizer buffers)."""
  ours = {path: np.asarray(var[...] if isinstance(var, nnx.Variable) else var)
          for path, var in nnx.to_flat_state(state)}
  pieces: dict[str, list[np.ndarray]] = {}
  for slot in param_slots(config):
    pieces.setdefault(slot.official, []).append(ours[slot.ours].T if slot.transpose else ours[slot.ours])
  return {k: np.concatenate(v, axis=0) if len(v) > 1 else v[0] for k, v in pieces.items()}


def export_state_dict(model: BSQViT) -> dict[str, np.ndarray]:
  """`model`'s weights as an official state dict, with the BSQ buffers (int64, as the official files)."""
  state_dict = state_to_official(nnx.state(model, nnx.Param), model.config)
  if isinstance(model.quantizer, quantizers.BSQ):
    bsq = model.quantizer.config
    state_dict["quantize.basis"] = _msb_basis(bsq.num_bits)
    state_dict["quantize.group_basis"] = _msb_basis(bsq.group_size)
  return state_dict


def _msb_basis(num_bits: int) -> np.ndarray:
  return 2 ** np.arange(num_bits - 1, -1, -1, dtype=np.int64)


def _check_quantizer_buffers(state_dict: Mapping[str, np.ndarray], model: BSQViT) -> None:
  """The official bit weights say how many bits (and which order) the checkpoint was trained with."""
  if not isinstance(model.quantizer, quantizers.BSQ):
    return  # a BSQ checkpoint's projections can seed another quantizer of the same width
  bsq = model.quantizer.config
  if "quantize.basis" in state_dict:
    basis = np.asarray(state_dict["quantize.basis"])
    if basis.shape != (bsq.num_bits,):
      raise CheckpointError(f"checkpoint 'quantize.basis' has shape {basis.shape}: a {basis.size}-bit "
                            f"model, but the config's quantizer has num_bits={bsq.num_bits}")
    if not np.array_equal(basis, _msb_basis(bsq.num_bits)):
      raise CheckpointError("checkpoint 'quantize.basis' is not the MSB-first 2**(L-1..0) of BSQ-ViT")
  if "quantize.group_basis" in state_dict:
    size = np.asarray(state_dict["quantize.group_basis"]).size
    if size != bsq.group_size:
      raise CheckpointError(f"checkpoint 'quantize.group_basis' has {size} entries, but the config's "
                            f"quantizer has group_size={bsq.group_size}")


def load_bsq_vit(path: str | pathlib.Path, config: Config | Mapping[str, Any], *,
                 wrapper_key: str | None = None) -> BSQViT:
  """Builds `BSQViT(config)` holding the weights of the official checkpoint at `path`.

  The model is built abstractly (no random init) and filled from the file.
  """
  state_dict = load_state_dict(path, wrapper_key=wrapper_key)
  model = nnx.eval_shape(lambda: BSQViT(config, rngs=nnx.Rngs(0)))
  try:
    nnx.update(model, convert_state_dict(state_dict, model))
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return model


def config_from_official(params: Mapping[str, Any]) -> dict[str, Any]:
  """The official `VITBSQModel` kwargs (a yaml's `model.params`) -> a `BSQViT` config dict.

  Follows the official code, not the kwargs, where they differ: `beta` is ignored and the
  quantizer's commitment weight is 0.25. Options the port does not implement raise an error.
  """
  params = dict(params)
  vit = dict(params.pop("vitconfig"))
  decoder_vit = params.pop("dvitconfig", None)
  if decoder_vit is not None and dict(decoder_vit) != vit:
    raise ValueError("BSQ-ViT with a decoder ViT config different from the encoder's is not supported")
  unsupported = {
      "logit_laplace": False, "cb_entropy_compute": "group", "post_q_l2_norm": True}
  for key, supported in unsupported.items():
    if params.get(key, supported) != supported:
      raise ValueError(f"official BSQ-ViT option {key}={params[key]!r} is not supported "
                       f"(only {supported!r})")
  if tuple(params.get("clamp_range", (-1, 1))) != (-1, 1):
    raise ValueError(f"bitgen images are in [-1, 1]; clamp_range={params['clamp_range']!r} is not "
                     "supported (the official zero_mean data convention gives (-1, 1))")
  for key in ("num_frames", "ls_init_value", "mask_type"):
    if key in vit and vit[key] not in (1, None, "none"):
      raise ValueError(f"official vitconfig option {key}={vit[key]!r} is not supported")
  return dict(
      image_size=vit["image_size"],
      patch_size=vit["patch_size"],
      width=vit["width"],
      depth=vit["layers"],
      heads=vit["heads"],
      mlp_ratio=float(vit.get("mlp_ratio", 4.0)),
      decoder_ffn_dim=vit.get("dim_ffn_output", 3072),
      l2_normalize=bool(params.get("l2_norm", False)),
      quantizer=dict(
          name="bsq",
          num_bits=params["embed_dim"],
          group_size=params.get("embed_group_size", 9),
          persample_entropy=params.get("persample_entropy_compute", "group"),
          inv_temperature=float(params.get("inv_temperature", 1.0)),
          beta=0.25,  # VITVQModel.__init__ overwrites the beta kwarg with its own default
          gamma0=float(params.get("gamma0", 1.0)),
          gamma=float(params.get("gamma", 1.0)),
          zeta=float(params.get("zeta", 1.0)),
      ),
  )
