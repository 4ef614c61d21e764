"""Recognising a quantizer's layer wrapper by a class marker, so that the low-level modules
(config matching, call points, BatchNorm pairing) need not import the wrapper itself."""
from __future__ import annotations

from typing import Any

WRAPPER_MARKER = "is_mixq_wrapper"


def is_wrapper(module: Any) -> bool:
    """True for a :class:`~mixq.compressor.wrapper.QuantizerModuleWrapper` (or a subclass)."""
    return bool(getattr(type(module), WRAPPER_MARKER, False))
