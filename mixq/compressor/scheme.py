"""The quantization scheme of a tensor: per tensor or per channel, symmetric or affine."""
from __future__ import annotations

from enum import Enum


class Scheme(str, Enum):
    """A quantization scheme; a ``str`` whose value is the config-list / calibration spelling
    (``Scheme('per_channel_symmetric') is Scheme.PER_CHANNEL_SYMMETRIC``)."""

    PER_TENSOR_SYMMETRIC = "per_tensor_symmetric"
    PER_TENSOR_AFFINE = "per_tensor_affine"
    PER_CHANNEL_SYMMETRIC = "per_channel_symmetric"
    PER_CHANNEL_AFFINE = "per_channel_affine"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def symmetric(self) -> bool:
        """Zero point 0 (int) or the grid's midpoint (uint); the range is widened to ``±max|x|``."""
        return self in (Scheme.PER_TENSOR_SYMMETRIC, Scheme.PER_CHANNEL_SYMMETRIC)

    @property
    def per_channel(self) -> bool:
        """One scale (and zero point) per output channel of a weight."""
        return self in (Scheme.PER_CHANNEL_SYMMETRIC, Scheme.PER_CHANNEL_AFFINE)


SCHEMES = tuple(s.value for s in Scheme)
