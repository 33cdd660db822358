"""Binary (and baseline) quantizers: pure functions plus thin NNX wrappers.

`build({"name": "bsq" | "lfq" | "fsq", ...})` returns a parameter-free NNX module (`BSQ`, `LFQ`,
`FSQ`; keys are the fields of `BSQConfig`, `LFQConfig`, `FSQConfig`) with `dim`, `num_bits`,
`__call__(z, *, compute_loss=True) -> QuantizerOutput`, `decode_codes` and `decode_indices`.
The pure functions are `bsq.quantize`, `lfq.quantize`, `fsq.quantize` (config as a static argument).

`QuantizerOutput.metrics` (stop-gradient): the unweighted loss terms `commitment`,
`persample_entropy`, `codebook_entropy` (nats; BSQ and LFQ, when compute_loss), BSQ's `avg_prob`;
usage statistics `distinct_codes`, `code_usage` (distinct / min(tokens, codebook size)) and
`bit_entropy` (L,) for binary codes or `level_entropy` (D,) for FSQ, both in bits (see `stats`).
"""

from bitgen.quantizers.base import QuantizerOutput
from bitgen.quantizers import bits
from bitgen.quantizers import bsq
from bitgen.quantizers import fsq
from bitgen.quantizers import lfq
from bitgen.quantizers import stats
from bitgen.quantizers.bsq import BSQConfig
from bitgen.quantizers.fsq import FSQConfig
from bitgen.quantizers.lfq import LFQConfig
from bitgen.quantizers.modules import BSQ, FSQ, LFQ
from bitgen.quantizers.registry import build
