"""LPIPS (VGG16) perceptual distance, as the official BSQ-ViT loss uses, from a USER-SUPPLIED file.

Nothing is downloaded: pass the path of a weight file (.npz, .safetensors, or .pth/.pt read with
torch `weights_only=True` when torch is installed) holding the 13 VGG16 convolutions and the 5 LPIPS
"lin" layers, under either naming:
  convolutions  `net.slice{1..5}.{i}.weight|bias` (taming / BSQ-ViT LPIPS state_dict) or
                `features.{i}.weight|bias` (torchvision vgg16), i in 0,2,5,7,10,12,14,17,19,21,24,26,28
  lin layers    `lin{0..4}.model.1.weight` (with dropout, as saved by LPIPS) or `lin{k}.model.0.weight`
with PyTorch layouts (conv weight (out, in, kh, kw)). Official forward (`transcoder/losses/lpips.py`,
zero_mean=True for images in [-1, 1]): x -> (x - shift) / scale with shift (-.030, -.088, -.188) and
scale (.458, .448, .450); VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; each
normalised over channels (x / (||x|| + 1e-10)); squared difference; 1x1 lin conv to one channel;
spatial mean; summed over the five layers. Returns one distance per image.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TAPS = (3, 8, 15, 22, 29)  # the ReLU after which each of the five features is taken
POOLS = (4, 9, 16, 23)     # 2x2 max-pools
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def read_weight_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """{name: array} from a .npz, .safetensors or .pth/.pt file; a missing file is a clear error."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"LPIPS weight file {path} not found. The perceptual loss needs a user-supplied file with "
        "the VGG16 and LPIPS lin weights (.npz, .safetensors or .pth; see bitgen/train/lpips.py); "
        "nothing is downloaded. Set perceptual_weight=0 to train without it.")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(str(path)))
  if suffix in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch; convert it to .npz or .safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.detach().float().numpy() for k, v in state.items()}
  raise ValueError(f"LPIPS weight file {path}: unknown format {suffix!r} "
                   "(expected .npz, .safetensors, .pth or .pt)")


def _canonical(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps either naming to `conv{i}.weight|bias` and `lin{k}.weight`."""
  out = {}
  for name, value in weights.items():
    if m := re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", name):
      out[f"conv{m[1]}.{m[2]}"] = value
    elif m := re.fullmatch(r"lin(\d)\.model\.[01]\.weight", name):
      out[f"lin{m[1]}.weight"] = value
  return out


class LPIPS:
  """`LPIPS(params)(x, y) -> [B]` for NHWC images in [-1, 1]; params from `from_file`."""

  def __init__(self, weights: dict[str, np.ndarray], *, where: str = "LPIPS weights"):
    weights = _canonical(weights)
    required = ([f"conv{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")]
                + [f"lin{k}.weight" for k in range(5)])
    missing = [k for k in required if k not in weights]
    if missing:
      raise ValueError(f"{where}: missing {len(missing)} entries, e.g. {missing[:4]} (expected "
                       "`net.slice*.<i>.*` or `features.<i>.*` convolutions and `lin<k>.model.1.weight`)")
    self.convs = []
    channels = 3
    for i in CONV_INDICES:
      w, b = weights[f"conv{i}.weight"], weights[f"conv{i}.bias"]
      if w.ndim != 4 or w.shape[1:] != (channels, 3, 3) or b.shape != (w.shape[0],):
        raise ValueError(f"{where}: convolution {i} has weight {w.shape} and bias {b.shape}; "
                         f"expected (out, {channels}, 3, 3) and (out,)")
      # (out, in, kh, kw) -> HWIO
      self.convs.append((jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32),
                         jnp.asarray(b, jnp.float32)))
      channels = w.shape[0]
    self.lins = []
    for k, tap in enumerate(TAPS):
      w = weights[f"lin{k}.weight"]
      tap_channels = self._channels_at(tap)
      if w.shape not in ((1, tap_channels, 1, 1), (1, tap_channels)):
        raise ValueError(f"{where}: lin{k} weight has shape {w.shape}; expected "
                         f"(1, {tap_channels}, 1, 1)")
      self.lins.append(jnp.asarray(w.reshape(tap_channels), jnp.float32))

  def _channels_at(self, layer: int) -> int:
    last = max(n for n, i in enumerate(CONV_INDICES) if i < layer)
    return self.convs[last][0].shape[-1]

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> "LPIPS":
    return cls(read_weight_file(path), where=f"LPIPS weight file {path}")

  def features(self, x: jax.Array) -> list[jax.Array]:
    """The five VGG16 feature maps of NHWC images in [-1, 1]."""
    x = (x - SHIFT) / SCALE
    taps, convs = [], iter(self.convs)
    for layer in range(TAPS[-1] + 1):
      if layer in CONV_INDICES:
        w, b = next(convs)
        x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
      elif layer in POOLS:
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      else:
        x = jax.nn.relu(x)
      if layer in TAPS:
        taps.append(x)
    return taps

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got {x.shape}, {y.shape}")
    total = jnp.zeros(x.shape[0], jnp.float32)
    for fx, fy, lin in zip(self.features(x), self.features(y), self.lins):
      fx = fx / (jnp.sqrt(jnp.sum(fx**2, axis=-1, keepdims=True)) + 1e-10)
      fy = fy / (jnp.sqrt(jnp.sum(fy**2, axis=-1, keepdims=True)) + 1e-10)
      # [B, H, W, C] -> [B, H, W] -> [B]
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", (fx - fy) ** 2, lin), axis=(1, 2))
    return total
