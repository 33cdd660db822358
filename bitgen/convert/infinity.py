"""Official Infinity checkpoints (PyTorch state_dicts) -> bitgen's `InfinityVAE` / `Infinity` params.

Sources: a dict of arrays, or a file read by `bitgen.convert.checkpoint_io` (`.npz`, `.safetensors`,
`.pt`/`.pth` through the optional torch with `weights_only=True`). VAE checkpoints come as
`{'vae': sd, 'ema': sd, ...}` (`use_ema` picks) or as a bare state_dict, with or without the
`.conv` / `.norm` wrapper level of the official `Conv` / `Normalize` classes. Transformer
checkpoints are bare ("slim") state_dicts, blocks named `blocks.{i}` or
`block_chunks.{c}.module.{j}`, `scale_mul_1H11` in either layout ((1, H, 1, 1) or the
customised-flash (1, 1, H, 1)); a longer `cfg_uncond` is cut to `text_maxlen` rows, as official.

Layouts: Linear weight (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out).
A key the model lacks, a key the checkpoint lacks, or a shape mismatch raises one `CheckpointError`
naming it.
"""

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.convert import checkpoint_io
from bitgen.convert.checkpoint_io import CheckpointError

StateDict = Mapping[str, np.ndarray]
Transform = Callable[[np.ndarray], np.ndarray]

# Buffers of the official modules that hold no parameter of ours.
_VAE_BUFFERS = re.compile(r"^(quantizer|quantize)\.lfq\.(mask|zero)$")
_TRANSFORMER_BUFFERS = re.compile(
    r"(zero_k_bias|lvl_1L|attn_bias_for_masking|Infinity_visible_kvlen|Infinity_invisible_qlen)$")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any], wrapper_key: str | None = None
                    ) -> dict[str, np.ndarray]:
  """A checkpoint file or an in-memory mapping -> flat `{official name: array}`."""
  if isinstance(source, Mapping):
    tree = {k: (dict(v) if isinstance(v, Mapping) else np.asarray(v)) for k, v in source.items()}
    return checkpoint_io.strip_prefix(checkpoint_io.unwrap(tree, "<mapping>", wrapper_key))
  return checkpoint_io.load_state_dict(source, wrapper_key=wrapper_key)


def _linear_kernel(w: np.ndarray) -> np.ndarray:
  return w.T


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def _assign(model: nnx.Module, specs: dict[tuple, tuple[list[str], Transform]], state_dict: StateDict,
            ignore: re.Pattern, what: str) -> None:
  """Fills every Param of `model` from `state_dict` by `specs[path] = (candidate keys, transform)`."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  updates, used, missing = [], set(), []
  for path, variable in flat:
    candidates, transform = specs[path]
    key = next((k for k in candidates if k in state_dict), None)
    if key is None:
      missing.append(candidates[0])
      continue
    value = transform(np.asarray(state_dict[key]))
    expected = tuple(variable.get_value().shape)
    if value.shape != expected:
      raise CheckpointError(f"{what} checkpoint key {key!r} has shape {tuple(np.shape(state_dict[key]))}, "
                       f"which does not fit the model's parameter {'.'.join(map(str, path))} {expected}: "
                       "the checkpoint was made for a different config")
    used.add(key)
    updates.append((path, jnp.asarray(value, variable.get_value().dtype)))
  if missing:
    raise CheckpointError(f"the {what} checkpoint lacks {len(missing)} key(s) the model needs, e.g. "
                     f"{missing[:5]}; is it an official {what} state_dict?")
  unexpected = sorted(k for k in state_dict if k not in used and not ignore.search(k))
  if unexpected:
    raise CheckpointError(f"the {what} checkpoint has {len(unexpected)} key(s) the model does not use, e.g. "
                     f"{unexpected[:5]}; is it an official {what} state_dict for this config?")
  nnx.update(model, nnx.from_flat_state(updates))


# ----------------------------------------------------------------------------------------------
# VAE


def _vae_specs(model: nnx.Module) -> dict[tuple, tuple[list[str], Transform]]:
  specs = {}
  for path, node in nnx.iter_graph(model):
    base = ".".join(map(str, path))
    if isinstance(node, nnx.Conv):
      specs[path + ("kernel",)] = ([f"{base}.conv.weight", f"{base}.weight"], _conv_kernel)
      specs[path + ("bias",)] = ([f"{base}.conv.bias", f"{base}.bias"], _identity)
    elif isinstance(node, nnx.GroupNorm):
      specs[path + ("scale",)] = ([f"{base}.norm.weight", f"{base}.weight"], _identity)
      specs[path + ("bias",)] = ([f"{base}.norm.bias", f"{base}.bias"], _identity)
  return specs


def vae_state_dict(source, *, use_ema: bool = False) -> dict[str, np.ndarray]:
  """The VAE weights of `{'vae': sd, 'ema': sd, ...}` (`use_ema` picks), or a bare state_dict."""
  try:
    return read_state_dict(source, wrapper_key="ema" if use_ema else "vae")
  except CheckpointError:
    if use_ema:
      raise
  return read_state_dict(source)


def load_vae_params(model: nnx.Module, source, *, use_ema: bool = False) -> nnx.Module:
  """Fills an `InfinityVAE` in place from an official checkpoint; returns it."""
  state_dict = vae_state_dict(source, use_ema=use_ema)
  _assign(model, _vae_specs(model), state_dict, _VAE_BUFFERS, "Infinity VAE")
  return model


def load_vae(source, config, *, use_ema: bool = False) -> nnx.Module:
  """Builds `InfinityVAE(config)` (abstractly: no random init) and loads an official checkpoint."""
  from bitgen.models.infinity_vae import InfinityVAE
  model = nnx.eval_shape(lambda: InfinityVAE(config, rngs=nnx.Rngs(0)))
  return load_vae_params(model, source, use_ema=use_ema)


# ----------------------------------------------------------------------------------------------
# Transformer

# (regex on our dotted param path, replacement giving the official key), applied in order.
_TRANSFORMER_RENAMES = [
    (r"^text_proj_for_ca\.fc1\.", "text_proj_for_ca.0."),
    (r"^text_proj_for_ca\.fc2\.", "text_proj_for_ca.2."),
    (r"^shared_ada_lin\.", "shared_ada_lin.1."),
    (r"^head_nm\.ada_lin\.", "head_nm.ada_lin.1."),
    (r"\.sa\.log_scale$", ".sa.scale_mul_1H11"),
    (r"\.kernel$", ".weight"),
    (r"\.embedding$", ".weight"),
    (r"\.ca_norm\.scale$", ".ca_norm.weight"),
]
_CHUNKED_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")


def _unchunk(state_dict: StateDict) -> dict[str, np.ndarray]:
  """Renames `block_chunks.{c}.module.{j}.*` to `blocks.{c * n + j}.*` (n blocks per chunk)."""
  matches = [_CHUNKED_BLOCK.match(k) for k in state_dict]
  per_chunk = 1 + max((int(m.group(2)) for m in matches if m), default=-1)
  out = {}
  for key, m in zip(state_dict, matches):
    new = key if m is None else f"blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}." + key[m.end():]
    out[new] = state_dict[key]
  return out


def _transformer_specs(model: nnx.Module) -> dict[tuple, tuple[list[str], Transform]]:
  specs = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = ".".join(map(str, path))
    for pattern, replacement in _TRANSFORMER_RENAMES:
      key = re.sub(pattern, replacement, key)
    shape = tuple(variable.get_value().shape)
    if path[-1] == "kernel":
      transform = _linear_kernel
    else:  # scale_mul_1H11 (1,H,1,1) or (1,1,H,1), ada_gss (1,1,6,C), pos_start (1,1,C) -> ours
      transform = lambda w, shape=shape: w.reshape(shape) if w.size == math.prod(shape) else w
    specs[path] = ([key], transform)
  return specs


def load_transformer_params(model: nnx.Module, source) -> nnx.Module:
  """Fills an `Infinity` in place from an official (text-conditional) state_dict; returns it."""
  if model.config.num_classes:
    raise CheckpointError("official Infinity checkpoints are text-conditional; this model is "
                          f"class-conditional (num_classes={model.config.num_classes})")
  state_dict = _unchunk(read_state_dict(source))
  rows = model.config.text_maxlen
  if "cfg_uncond" in state_dict and state_dict["cfg_uncond"].shape[0] != rows:
    have = state_dict["cfg_uncond"].shape[0]
    if have < rows:
      raise CheckpointError(f"the checkpoint's null caption cfg_uncond has {have} rows, fewer than "
                            f"text_maxlen={rows}; build the model with text_maxlen <= {have}")
    state_dict["cfg_uncond"] = state_dict["cfg_uncond"][:rows]  # as the official load_state_dict
  _assign(model, _transformer_specs(model), state_dict, _TRANSFORMER_BUFFERS, "Infinity transformer")
  return model


def load_transformer(source, config) -> nnx.Module:
  """Builds `Infinity(config)` (abstractly: no random init) and loads an official state_dict."""
  from bitgen.models.infinity import Infinity
  model = nnx.eval_shape(lambda: Infinity(config, rngs=nnx.Rngs(0)))
  return load_transformer_params(model, source)
