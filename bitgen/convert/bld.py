"""Official Binary Latent Diffusion checkpoints -> bitgen modules.

Autoencoder: `binaryae_*.th` is the `BinaryGAN` state dict (`ae.*`, plus `disc.*` and
`perceptual.*`, which are ignored); a bare `BinaryAutoEncoder` state dict (no `ae.`) loads too.
Denoiser: `bld_*.th` is the `BinaryDiffusion` state dict (`_denoise_fn.*`, `embedding_weight`,
`scheduler.*`); a bare `TransformerBD` state dict loads too.

A state dict is a mapping of official key -> array in PyTorch layout (Linear (out, in), Conv2d
(out, in, kh, kw)), or a checkpoint file (.npz, .safetensors, or torch .th/.pt, which needs torch).
Every parameter of the module must be found with its shape; every other key must be one the
reference keeps unused, else a `CheckpointError` (a ValueError) names the keys. The module may be abstract
(`nnx.eval_shape(lambda: Model(config, rngs=...))`), which skips the random initialisation.
"""

import os
from collections.abc import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitgen.convert import checkpoint_io
from bitgen.convert.checkpoint_io import CheckpointError
from bitgen.models import bld_autoencoder as ae_lib
from bitgen.models import bld_denoiser as den_lib

StateDict = Mapping[str, np.ndarray]
Path = tuple  # a parameter path inside a module, as in nnx.to_flat_state
Entry = tuple[Path, str, Callable[[np.ndarray], np.ndarray]]


def read_state_dict(source: StateDict | str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict from a mapping or a checkpoint file (see `checkpoint_io.load_state_dict`)."""
  if isinstance(source, Mapping):
    return {k: np.asarray(v) for k, v in source.items()}
  return checkpoint_io.load_state_dict(os.fspath(source))


# --- layout transforms (PyTorch -> flax) ---

def _conv(w):  # (O, I, kh, kw) -> (kh, kw, I, O)
  return np.transpose(w, (2, 3, 1, 0))


def _conv1x1(w):  # (O, I, 1, 1) -> (I, O)
  return np.transpose(w[:, :, 0, 0])


def _dense(w):  # (O, I) -> (I, O)
  return np.transpose(w)


def _same(w):
  return w


def _conv_entries(ours: Path, theirs: str) -> Iterator[Entry]:
  yield (*ours, "kernel"), f"{theirs}.weight", _conv
  yield (*ours, "bias"), f"{theirs}.bias", _same


def _conv1x1_entries(ours: Path, theirs: str) -> Iterator[Entry]:
  yield (*ours, "kernel"), f"{theirs}.weight", _conv1x1
  yield (*ours, "bias"), f"{theirs}.bias", _same


def _norm_entries(ours: Path, theirs: str) -> Iterator[Entry]:
  yield (*ours, "scale"), f"{theirs}.weight", _same
  yield (*ours, "bias"), f"{theirs}.bias", _same


def _dense_entries(ours: Path, theirs: str, *, bias: bool = True) -> Iterator[Entry]:
  yield (*ours, "kernel"), f"{theirs}.weight", _dense
  if bias:
    yield (*ours, "bias"), f"{theirs}.bias", _same


def _cnn_entries(blocks, ours: Path, theirs: str) -> Iterator[Entry]:
  """Entries of an Encoder/Decoder block list; blocks[i] is the reference's blocks.{i}."""
  for i, block in enumerate(blocks):
    o, t = (*ours, i), f"{theirs}.{i}"
    if isinstance(block, nnx.Conv):
      yield from _conv_entries(o, t)
    elif isinstance(block, nnx.GroupNorm):
      yield from _norm_entries(o, t)
    elif isinstance(block, (ae_lib.Downsample, ae_lib.Upsample)):
      yield from _conv_entries((*o, "conv"), f"{t}.conv")
    elif isinstance(block, ae_lib.ResBlock):
      for name in ("norm1", "norm2"):
        yield from _norm_entries((*o, name), f"{t}.{name}")
      for name in ("conv1", "conv2"):
        yield from _conv_entries((*o, name), f"{t}.{name}")
      if block.shortcut is not None:
        yield from _conv1x1_entries((*o, "shortcut"), f"{t}.conv_out")
    elif isinstance(block, ae_lib.AttnBlock):
      yield from _norm_entries((*o, "norm"), f"{t}.norm")
      for name in ("q", "k", "v", "proj_out"):
        yield from _conv1x1_entries((*o, name), f"{t}.{name}")
    else:
      raise TypeError(f"no converter for block {type(block).__name__} at {t}")


def autoencoder_entries(model: ae_lib.BinaryAutoencoder) -> Iterator[Entry]:
  yield from _cnn_entries(model.encoder.blocks, ("encoder", "blocks"), "encoder.blocks")
  yield from _conv1x1_entries(("quant_proj",), "quantize.proj.0")
  # nn.Embedding weight (num_bits, emb_dim) is already the (in, out) kernel of bits @ weight.
  yield ("code_embed", "kernel"), "quantize.embed.weight", _same
  yield from _cnn_entries(model.decoder.blocks, ("decoder", "blocks"), "generator.blocks")


def _is_unused_autoencoder_key(key: str) -> bool:
  """Keys the reference stores but never uses in the forward pass."""
  return (key.startswith("generator.logsigma.")
          or (".conv_out." in key and ".blocks." in key))  # ResBlock shortcut when in == out


def _load(model: nnx.Module, state_dict: dict[str, np.ndarray], entries: Iterator[Entry],
          what: str, is_unused: Callable[[str], bool]) -> nnx.Module:
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  consumed = set()
  problems = []
  for path, key, transform in entries:
    if key not in state_dict:
      problems.append(f"missing key {key!r}")
      continue
    value = transform(np.asarray(state_dict[key]))
    target = flat[path]
    current = target.get_value()  # an array, or a ShapeDtypeStruct for an nnx.eval_shape model
    if tuple(value.shape) != tuple(current.shape):
      problems.append(
          f"{key!r}: checkpoint shape {tuple(state_dict[key].shape)} does not fit the config "
          f"(parameter {'/'.join(map(str, path))} has shape {tuple(current.shape)} after transposing)")
      continue
    target.set_value(jnp.asarray(value, dtype=current.dtype))
    consumed.add(key)
  unexpected = sorted(k for k in state_dict if k not in consumed and not is_unused(k))
  if problems or unexpected:
    lines = problems + ([f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"]
                        if unexpected else [])
    raise CheckpointError(f"checkpoint does not match the {what}:\n  " + "\n  ".join(lines))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def _strip_prefix(state_dict: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  if any(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return state_dict


def load_autoencoder(model: ae_lib.BinaryAutoencoder, source) -> ae_lib.BinaryAutoencoder:
  """Loads an official binary autoencoder (BinaryGAN `ae.*` or bare) into `model`, in place."""
  state_dict = read_state_dict(source)
  if any(k.startswith("_denoise_fn.") or k.startswith("tok_emb.") for k in state_dict):
    raise CheckpointError("this is a Binary Latent Diffusion denoiser checkpoint (bld_*.th), not an "
                     "autoencoder one (binaryae_*.th); load it with load_denoiser")
  state_dict = _strip_prefix(state_dict, "ae.")
  state_dict = {k: v for k, v in state_dict.items()
                if not k.startswith(("disc.", "perceptual."))}
  if not any(k.startswith("encoder.blocks.") for k in state_dict):
    raise CheckpointError("checkpoint has no 'encoder.blocks.*' (nor 'ae.encoder.blocks.*') keys: "
                     "not a Binary Latent Diffusion autoencoder")
  return _load(model, state_dict, autoencoder_entries(model), "binary autoencoder config",
               _is_unused_autoencoder_key)


def _rows(start: int, stop: int, transform):
  return lambda w: transform(w[start:stop])


def denoiser_entries(model: den_lib.Denoiser) -> Iterator[Entry]:
  d = model.config.width
  yield ("tok_emb", "kernel"), "tok_emb.weight", _same  # used as (2x-1) @ weight: (C, D)
  yield ("pos_emb",), "pos_emb", lambda w: w[0]
  if model.cls_emb is not None:
    yield ("cls_emb", "embedding"), "cls_embedding.weight", _same
  for i in range(len(model.blocks)):
    o, t = ("blocks", i), f"blocks.{i}"
    yield (*o, "gamma_1"), f"{t}.gamma_1", _same
    yield (*o, "gamma_2"), f"{t}.gamma_2", _same
    yield from _norm_entries((*o, "ln_1"), f"{t}.ln1")
    yield from _norm_entries((*o, "ln_2"), f"{t}.ln2")
    # Fused qkv: output features ordered (3, heads, head_dim).
    for j, name in enumerate(("query", "key", "value")):
      yield (*o, "attn", name, "kernel"), f"{t}.attn.qkv.weight", _rows(j * d, (j + 1) * d, _dense)
      yield (*o, "attn", name, "bias"), f"{t}.attn.qkv.bias", _rows(j * d, (j + 1) * d, _same)
    yield from _dense_entries((*o, "attn", "out"), f"{t}.attn.proj")
    yield from _dense_entries((*o, "mlp", "up"), f"{t}.mlp.0")
    yield from _dense_entries((*o, "mlp", "down"), f"{t}.mlp.2")
  yield from _norm_entries(("ln_f",), "ln_f")
  yield from _dense_entries(("head",), "head")
  yield from _dense_entries(("time_token", "l0"), "time_step_embedding.l0")
  yield from _dense_entries(("time_token", "linear"), "time_step_embedding.linear")


def load_denoiser(model: den_lib.Denoiser, source, *, schedule=None) -> den_lib.Denoiser:
  """Loads an official denoiser (BinaryDiffusion `_denoise_fn.*` or bare TransformerBD), in place.

  With `schedule` (a `bitgen.sample.binary_diffusion.NoiseSchedule`), the checkpoint's
  `scheduler.*` buffers must match it (same number of training steps and schedule type).
  """
  state_dict = read_state_dict(source)
  if any(k.startswith(("ae.", "encoder.blocks.", "generator.blocks.")) for k in state_dict):
    raise CheckpointError("this is a binary autoencoder checkpoint (binaryae_*.th), not a denoiser one "
                     "(bld_*.th); load it with load_autoencoder")
  if schedule is not None:
    check_schedule(state_dict, schedule)
  state_dict = _strip_prefix(state_dict, "_denoise_fn.")
  if "tok_emb.weight" not in state_dict:
    raise CheckpointError("checkpoint has no 'tok_emb.weight' (nor '_denoise_fn.tok_emb.weight'): "
                     "not a Binary Latent Diffusion denoiser")
  if model.cls_emb is None and "cls_embedding.weight" in state_dict:
    raise CheckpointError("checkpoint is class-conditional (has cls_embedding.weight) but the config "
                     "has num_classes=0")
  unused = lambda k: k == "embedding_weight" or k.startswith("scheduler.")
  return _load(model, state_dict, denoiser_entries(model), "denoiser config", unused)


def check_schedule(state_dict: StateDict, schedule) -> None:
  """Raises CheckpointError unless the checkpoint's `scheduler.*` buffers equal `schedule`'s."""
  for name in ("k_final", "b_final", "beta"):
    key = f"scheduler.{name}"
    if key not in state_dict:
      raise CheckpointError(f"checkpoint has no {key!r} buffer to check the noise schedule against")
    theirs, ours = np.asarray(state_dict[key]), np.asarray(getattr(schedule, name))
    if theirs.shape != ours.shape:
      raise CheckpointError(
          f"checkpoint was trained with T={theirs.shape[0] - 1} diffusion steps, the config has "
          f"total_steps={ours.shape[0] - 1}")
    if not np.allclose(theirs, ours, atol=1e-6):
      raise CheckpointError(
          f"checkpoint's {key} differs from the config's {schedule.kind!r} schedule "
          f"(max |diff| {np.abs(theirs - ours).max():.3g}): wrong beta_type?")
