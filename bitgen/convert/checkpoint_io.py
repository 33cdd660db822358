"""Reading official checkpoint files into a flat `{name: numpy array}` state dict.

Formats: `.npz`, `.safetensors`, and PyTorch `.pt` / `.pth` / `.bin` / `.ckpt` through an optional
`torch` import with `torch.load(..., weights_only=True)` (no pickled code runs). Training checkpoints
that wrap the weights (`{"state_dict": ...}`, `{"ema_state_dict": ...}`, `{"model": ...}`) and
DataParallel prefixes (`module.`) are unwrapped. Any unreadable, truncated or corrupt file raises
`CheckpointError` naming the file and the cause.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")  # .th: Binary Latent Diffusion
# Keys under which training scripts nest the weights, in the order they are tried.
WRAPPER_KEYS = ("ema_state_dict", "state_dict", "model", "module", "params")


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read, or whose contents do not fit the model."""


def load_state_dict(path: str | pathlib.Path, *, wrapper_key: str | None = None) -> dict[str, np.ndarray]:
  """Reads `path` -> `{name: array}` with the official names (prefix `module.` removed).

  `wrapper_key` picks the nested dict of a training checkpoint (e.g. "state_dict" for the raw
  weights instead of the default EMA weights); by default the first of `WRAPPER_KEYS` present.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"checkpoint {path} does not exist")
  suffix = path.suffix.lower()
  try:
    if suffix == ".npz":
      raw = _load_npz(path)
    elif suffix == ".safetensors":
      raw = _load_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
      raw = _load_torch(path)
    else:
      raise CheckpointError(
          f"checkpoint {path}: unknown format {suffix!r}; expected .npz, .safetensors or one of "
          f"{TORCH_SUFFIXES}")
  except CheckpointError:
    raise
  except ImportError:
    raise
  except Exception as e:  # every reader has its own exception types for corrupt files
    raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e})") from e
  return strip_prefix(unwrap(raw, path, wrapper_key))


def unwrap(tree: Mapping[str, Any], path: Any, wrapper_key: str | None = None) -> dict[str, np.ndarray]:
  """Finds the flat name -> array mapping inside a (possibly nested) training checkpoint."""
  if wrapper_key is not None:
    if wrapper_key not in tree or not isinstance(tree[wrapper_key], Mapping):
      raise CheckpointError(f"checkpoint {path} has no state dict under {wrapper_key!r}; "
                            f"top-level keys: {sorted(tree)[:20]}")
    tree = tree[wrapper_key]
  elif not _is_flat(tree):
    for key in WRAPPER_KEYS:
      if isinstance(tree.get(key), Mapping):
        tree = tree[key]
        break
    else:
      raise CheckpointError(f"checkpoint {path} holds no state dict of arrays; top-level keys: "
                            f"{sorted(tree)[:20]} (pass wrapper_key=...)")
  if not _is_flat(tree):
    bad = next(k for k, v in tree.items() if not isinstance(v, np.ndarray))
    raise CheckpointError(f"checkpoint {path}: entry {bad!r} is not an array")
  return dict(tree)


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str = "module.") -> dict[str, np.ndarray]:
  """Removes `prefix` (repeatedly, e.g. `module.module.` of an EMA of a DDP model) if every key has it."""
  state_dict = dict(state_dict)
  while state_dict and all(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def _is_flat(tree: Mapping[str, Any]) -> bool:
  return bool(tree) and all(isinstance(v, np.ndarray) for v in tree.values())


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(path))


def _load_torch(path: pathlib.Path) -> dict[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs PyTorch (pip install 'bitgen[torch]'), or convert it to .npz / "
        ".safetensors first") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
  return _tensors_to_numpy(obj)


def _tensors_to_numpy(tree: Any) -> Any:
  import torch
  if isinstance(tree, torch.Tensor):
    tensor = tree.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
      tensor = tensor.float()
    return tensor.numpy()
  if isinstance(tree, Mapping):
    return {k: _tensors_to_numpy(v) for k, v in tree.items()}
  return tree
