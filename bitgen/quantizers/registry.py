"""`build(config)`: a quantizer module from a config dict such as `{"name": "bsq", "num_bits": 18}`."""

from collections.abc import Mapping
from typing import Any

from bitgen import configlib
from bitgen.quantizers import bsq
from bitgen.quantizers import fsq
from bitgen.quantizers import lfq
from bitgen.quantizers import modules

# name -> (config dataclass, module class)
QUANTIZERS = {
    "bsq": (bsq.BSQConfig, modules.BSQ),
    "lfq": (lfq.LFQConfig, modules.LFQ),
    "fsq": (fsq.FSQConfig, modules.FSQ),
}


def build(config: Mapping[str, Any] | Any):
  """Builds the quantizer named by `config["name"]`; the other keys fill its config dataclass.

  Accepts a dict or an `ml_collections.ConfigDict`. Unknown names and keys raise ValueError.
  """
  values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  name = values.pop("name", None)
  if name not in QUANTIZERS:
    raise ValueError(f"unknown quantizer name {name!r} in quantizer config; known: {sorted(QUANTIZERS)}")
  config_cls, module_cls = QUANTIZERS[name]
  return module_cls(configlib.from_dict(config_cls, values, where=f"quantizer config ({name})"))
