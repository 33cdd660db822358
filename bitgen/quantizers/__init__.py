"""Binary (and baseline) quantizers: pure functions plus thin NNX wrappers."""

from bitgen.quantizers.base import QuantizerOutput
from bitgen.quantizers import bits
