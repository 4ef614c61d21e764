"""Integer grids of activations: what a tracked range quantizes to, stored in int8."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..compressor.calibration_record import QuantParams
from ..compressor.fake_quant import FP16_BITS, is_integer_bits, is_symmetric, qparams_from_range, quant_range


def precision_of_bits(bits: Optional[int]) -> str:
    """'int8' for 1..8 bits, 'fp16' for 16, 'fp32' otherwise (or not quantized)."""
    if bits is None:
        return "fp32"
    if is_integer_bits(bits):
        return "int8"
    return "fp16" if bits == FP16_BITS else "fp32"


@dataclass(frozen=True)
class Grid:
    """A per-tensor integer grid: the real values ``k * scale`` for integers ``lo <= k <= hi``.

    Stored in int8 with zero point :attr:`zero_point`; :attr:`needs_clip` says the grid is
    narrower than int8 (2-7 bits), so a Clip must follow the DequantizeLinear.
    """

    scale: float
    lo: int
    hi: int

    @property
    def zero_point(self) -> int:
        return 0 if self.lo >= -128 and self.hi <= 127 else -128 - self.lo

    @property
    def needs_clip(self) -> bool:
        return (self.lo, self.hi) != (-128 - self.zero_point, 127 - self.zero_point)

    @property
    def real_min(self) -> float:
        return float(np.float32(self.lo) * np.float32(self.scale))

    @property
    def real_max(self) -> float:
        return float(np.float32(self.hi) * np.float32(self.scale))

    def admits_bound(self, value: Optional[float], upper: bool) -> bool:
        """True if clipping at ``value`` commutes with quantizing on this grid."""
        if value is None:
            return True
        if (upper and value >= self.real_max) or (not upper and value <= self.real_min):
            return True
        k = value / self.scale
        return abs(k - round(k)) < 1e-4 and self.lo <= round(k) <= self.hi


def grid_from_range(min_val: float, max_val: float, bits: int, scheme: str, dtype: str) -> Grid:
    """The grid :func:`qparams_from_range` gives a tracked range (what the quantizer simulated)."""
    scale, zero_point = qparams_from_range(torch.tensor(min_val), torch.tensor(max_val), bits, scheme, dtype)
    qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
    zp = int(zero_point)
    return Grid(float(np.float32(float(scale))), qmin - zp, qmax - zp)


def grid_of(params: Optional[QuantParams]) -> Optional[Grid]:
    """The grid of an integer tensor type with a tracked range; None for anything else."""
    if params is None or not params.integer or not params.has_range:
        return None
    return grid_from_range(params.tracked_min, params.tracked_max, params.bits, params.scheme, params.dtype)
