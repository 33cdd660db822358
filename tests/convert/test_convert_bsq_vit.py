"""Official BSQ-ViT state dict -> BSQViT parameters: lossless, and clear errors for every mismatch."""

import json

import numpy as np
import pytest
from flax import nnx

from bitgen.convert import bsq_vit as convert
from bitgen.convert.checkpoint_io import CheckpointError
from bitgen.models.bsq_vit import BSQViT
from conftest import PARITY_DIR, load_parity


@pytest.fixture(scope="module")
def weights():
  return load_parity("bsq_vit", "weights.npz")


@pytest.fixture(scope="module")
def config(weights):
  del weights  # requested first so that a missing fixture folder skips with its reason
  kwargs = json.loads((PARITY_DIR / "bsq_vit" / "config.json").read_text())["kwargs"]
  return convert.config_from_official(kwargs)


def abstract(config):
  return nnx.eval_shape(lambda: BSQViT(config, rngs=nnx.Rngs(0)))


def test_conversion_is_lossless(weights, config):
  model = abstract(config)
  nnx.update(model, convert.convert_state_dict(weights, model))
  exported = convert.export_state_dict(model)
  assert sorted(exported) == sorted(weights)
  for name, array in weights.items():
    assert exported[name].dtype == array.dtype, name
    np.testing.assert_array_equal(exported[name], array, err_msg=name)


def test_load_from_files(tmp_path, weights, config):
  from safetensors.numpy import save_file
  save_file(weights, str(tmp_path / "w.safetensors"))
  from_npz = convert.load_bsq_vit(PARITY_DIR / "bsq_vit" / "weights.npz", config)
  from_safetensors = convert.load_bsq_vit(tmp_path / "w.safetensors", config)
  for model in (from_npz, from_safetensors):
    np.testing.assert_array_equal(
        model.encoder.patch_embed.kernel[...], weights["encoder.conv1.weight"].T)
    _, k, _ = np.split(weights["decoder.transformer.resblocks.1.attn.in_proj_weight"], 3)
    np.testing.assert_array_equal(model.decoder.transformer.blocks[1].attn.key.kernel[...], k.T)


def without(d, key):
  return {k: v for k, v in d.items() if k != key}


def test_mismatches_name_the_key(weights, config):
  model = abstract(config)
  with pytest.raises(CheckpointError, match=r"missing key\(s\) \['encoder.ln_pre.bias'\]"):
    convert.convert_state_dict(without(weights, "encoder.ln_pre.bias"), model)
  extra = {**weights, "encoder.transformer.resblocks.2.ln_1.weight": np.ones(64, np.float32)}
  with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['encoder.transformer.resblocks.2"):
    convert.convert_state_dict(extra, model)
  wide = {**weights, "quant_embed.weight": np.zeros((36, 64), np.float32)}
  with pytest.raises(CheckpointError, match=r"'quant_embed.weight' has shape \(36, 64\), the config needs \(18, 64\)"):
    convert.convert_state_dict(wide, model)
  ints = {**weights, "decoder.ln_post.bias": weights["decoder.ln_post.bias"].astype(np.int32)}
  with pytest.raises(CheckpointError, match="'decoder.ln_post.bias' has dtype int32"):
    convert.convert_state_dict(ints, model)


def test_checkpoint_of_another_config(weights, config):
  deeper = abstract({**config, "depth": 3})
  with pytest.raises(CheckpointError, match=r"depth=3\): missing key\(s\) \['decoder.transformer.resblocks.2"):
    convert.convert_state_dict(weights, deeper)
  regrouped = abstract({**config, "quantizer": {**config["quantizer"], "group_size": 6}})
  with pytest.raises(CheckpointError, match="'quantize.group_basis' has 9 entries.*group_size=6"):
    convert.convert_state_dict(weights, regrouped)
  lsb = {**weights, "quantize.basis": weights["quantize.basis"][::-1]}
  with pytest.raises(CheckpointError, match="not the MSB-first"):
    convert.convert_state_dict(lsb, abstract(config))


def test_wrong_model(config):
  other = load_parity("bsq_quantizer", "fixture.npz")
  with pytest.raises(CheckpointError, match="not an official BSQ-ViT"):
    convert.convert_state_dict(other, abstract(config))


def test_corrupt_file(tmp_path, config):
  data = (PARITY_DIR / "bsq_vit" / "weights.npz").read_bytes()
  (tmp_path / "partial.npz").write_bytes(data[: len(data) // 3])
  with pytest.raises(CheckpointError, match="partial.npz is unreadable or corrupt"):
    convert.load_bsq_vit(tmp_path / "partial.npz", config)


def test_official_kwargs_it_cannot_port(config):
  kwargs = json.loads((PARITY_DIR / "bsq_vit" / "config.json").read_text())["kwargs"]
  assert convert.config_from_official(kwargs)["quantizer"]["beta"] == 0.25  # kwargs say 0: ignored
  with pytest.raises(ValueError, match="logit_laplace=True is not supported"):
    convert.config_from_official({**kwargs, "logit_laplace": True})
  with pytest.raises(ValueError, match="clamp_range"):
    convert.config_from_official({**kwargs, "clamp_range": (0, 1)})
