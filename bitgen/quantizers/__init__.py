"""Binary (and baseline) quantizers: pure functions plus thin NNX wrappers."""

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
