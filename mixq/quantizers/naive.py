"""Weight-only round-to-nearest quantization (NNI's NaiveQuantizer, which truncated; we round)."""
from __future__ import annotations

from ..compressor.config import ConfigListSpec
from ..compressor.quantizer import Quantizer


class NaiveQuantizer(Quantizer):
    """Symmetric 8-bit (or fewer bits) weight quantization with ranges from the weights'
    min/max, per output channel by default. Needs no data; exports like every quantizer."""

    @classmethod
    def config_spec(cls) -> ConfigListSpec:
        return ConfigListSpec(quant_types=("weight",), max_bits=8, quantizer=cls.__name__)
