"""Trains one tokenizer config with several quantizers at an equal bit budget and tabulates them."""

import copy
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from bitgen.eval.tokenizer import evaluate_result


def variant(config, name: str):
  """`config` with its tokenizer's quantizer swapped for `name` at the same number of bits."""
  config = copy.deepcopy(config)
  quantizer = config.model.quantizer
  if quantizer.name != name:
    with config.model.unlocked():
      # Each quantizer's defaults at this many bits (FSQ: 4 levels per 2 bits, see fsq.levels_for_bits).
      config.model.quantizer = {"name": name, "num_bits": int(quantizer.num_bits)}
      # Only BSQ works on the unit sphere; LFQ and FSQ take the raw projection, as in their papers.
      config.model.l2_normalize = name == "bsq"
  return config


def compare_quantizers(config, workdir: pathlib.Path, names: Sequence[str]) -> list[dict[str, Any]]:
  """Trains and evaluates `config` once per quantizer in `workdir/<name>`; writes compare.json."""
  from bitgen import train  # pylint: disable=g-import-not-at-top
  rows = []
  for name in names:
    run_config = variant(config, name)
    report = evaluate_result(run_config, train.run(run_config, workdir / name))
    rows.append({"quantizer": name, **report})
  if jax.process_index() == 0:
    (workdir / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  header = ("| quantizer | bits/token | PSNR (dB) | SSIM | mean bit entropy | code usage | "
            "baseline PSNR |\n|---|---|---|---|---|---|---|")
  lines = [header] + [
      f"| {r['quantizer']} | {r['bits_per_token']:g} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
      f"{r['mean_bit_entropy']:.3f} | {r['code_usage']:.3f} | {r['baseline_psnr']:.2f} |"
      for r in rows]
  return "\n".join(lines)
