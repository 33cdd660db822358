"""LPIPS from a user-supplied weight file: formats, namings, a NumPy reference, and errors."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from bitgen.train.lpips import CONV_INDICES, LPIPS, read_weight_file
from bitgen.train.tokenizer import TokenizerTask

WIDTHS = (4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8)  # tiny stand-ins for VGG16's 64..512 channels
TAP_CONVS = (1, 3, 6, 9, 12)                     # the conv feeding relu1_2 ... relu5_3


def _weights(seed=0):
  """Random weights under the taming/BSQ-ViT LPIPS state_dict names."""
  rng = np.random.default_rng(seed)
  out, channels = {}, 3
  slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
  for n, (i, width) in enumerate(zip(CONV_INDICES, WIDTHS)):
    s = next(k for k, (a, b) in enumerate(slices) if a <= i < b) + 1
    out[f"net.slice{s}.{i}.weight"] = rng.normal(0, 0.3, (width, channels, 3, 3)).astype(np.float32)
    out[f"net.slice{s}.{i}.bias"] = rng.normal(0, 0.1, (width,)).astype(np.float32)
    channels = width
  for k, n in enumerate(TAP_CONVS):
    out[f"lin{k}.model.1.weight"] = np.abs(rng.normal(size=(1, WIDTHS[n], 1, 1))).astype(np.float32)
  return out


def _reference(weights, x, y):
  """The official LPIPS forward in NumPy, NHWC, written from transcoder/losses/lpips.py."""
  shift = np.array([-.030, -.088, -.188]); scale = np.array([.458, .448, .450])
  convs = [(weights[k], weights[k.replace("weight", "bias")]) for k in sorted(
      (k for k in weights if k.startswith("net") and k.endswith("weight")),
      key=lambda k: int(k.split(".")[2]))]

  def feats(img):
    h, out = (img - shift) / scale, []
    for n, (w, b) in enumerate(convs):
      if n in (2, 4, 7, 10):  # a max-pool precedes these convolutions
        bsz, hh, ww, c = h.shape
        h = h.reshape(bsz, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
      size = h.shape[1]
      padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
      h = sum(np.einsum("bhwi,oi->bhwo", padded[:, dy:dy + size, dx:dx + size], w[:, :, dy, dx])
              for dy in range(3) for dx in range(3)) + b
      h = np.maximum(h, 0)
      if n in TAP_CONVS:
        out.append(h)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(feats(x), feats(y))):
    a = a / (np.sqrt((a**2).sum(-1, keepdims=True)) + 1e-10)
    b = b / (np.sqrt((b**2).sum(-1, keepdims=True)) + 1e-10)
    lin = weights[f"lin{k}.model.1.weight"].reshape(-1)
    total = total + (((a - b) ** 2) @ lin).mean(axis=(1, 2))
  return total


def test_lpips_matches_numpy_reference_and_formats(tmp_path):
  weights = _weights()
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  np.savez(tmp_path / "lpips.npz", **weights)
  # The same weights under torchvision's `features.<i>` names, as safetensors, without dropout.
  renamed = {(f"features.{k.split('.', 2)[2]}" if k.startswith("net.") else
              k.replace("model.1", "model.0")): v for k, v in weights.items()}
  save_file(renamed, str(tmp_path / "lpips.safetensors"))
  from_npz = LPIPS.from_file(tmp_path / "lpips.npz")
  from_safetensors = LPIPS.from_file(tmp_path / "lpips.safetensors")
  d = np.asarray(from_npz(x, y))
  np.testing.assert_allclose(d, _reference(weights, x.astype(np.float64), y.astype(np.float64)),
                             rtol=1e-4)
  np.testing.assert_array_equal(d, np.asarray(from_safetensors(x, y)))
  assert d.shape == (2,) and np.all(d > 0)
  np.testing.assert_allclose(np.asarray(from_npz(x, x)), 0, atol=1e-7)


def test_lpips_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    read_weight_file(tmp_path / "vgg.pth")
  with pytest.raises(FileNotFoundError, match="not found"):
    TokenizerTask({"image_size": 16}, loss={"perceptual_weight": 0.1,
                                             "lpips_weights": str(tmp_path / "absent.npz")})
  weights = _weights()
  del weights["lin3.model.1.weight"]
  with pytest.raises(ValueError, match=r"missing 1 entries.*lin3.weight"):
    LPIPS(weights)
  weights = _weights()
  weights["net.slice2.5.weight"] = weights["net.slice2.5.weight"][:, :2]
  with pytest.raises(ValueError, match="convolution 5 has weight"):
    LPIPS(weights)
  (tmp_path / "w.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown format"):
    read_weight_file(tmp_path / "w.bin")


def test_tokenizer_loss_adds_weighted_lpips(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import fixtures  # pylint: disable=g-import-not-at-top
  np.savez(tmp_path / "lpips.npz", **_weights())
  task = TokenizerTask(fixtures.model_config(), loss={
      "perceptual_weight": 0.5, "lpips_weights": str(tmp_path / "lpips.npz")})
  graphdef, state = nnx.split(task.build_model(nnx.Rngs(0)))
  images = fixtures.images(2)

  @jax.jit
  def loss(state, images):
    model = nnx.merge(graphdef, state)
    value, metrics = task.loss(model, {"image": images}, step=2000, rng=None)
    return value, metrics, model(images)[0]

  value, metrics, recon = loss(state, images)
  perceptual = np.mean(np.asarray(task.perceptual(images, recon)))
  np.testing.assert_allclose(float(metrics["perceptual"]), perceptual, rtol=1e-5)
  np.testing.assert_allclose(
      float(value), float(metrics["l1"]) + 0.5 * perceptual + 0.1 * float(metrics["quant_loss"]),
      rtol=1e-5)
