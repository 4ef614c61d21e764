"""Quantization algorithms: QAT, naive weight-only, and observer-based post-training."""
from .naive import NaiveQuantizer
from .observer import ObserverQuantizer
from .qat import QAT_Quantizer
from .reconstruction import ReconstructionQuantizer

__all__ = ["QAT_Quantizer", "NaiveQuantizer", "ObserverQuantizer", "ReconstructionQuantizer"]
