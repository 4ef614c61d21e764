"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down on a fixed grid.

The quantized weight is ``(clamp(floor(w / s) + h(V) + z, qmin, qmax) - z) * s`` with the
rectified sigmoid ``h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``. ``V`` starts
where ``h(V)`` equals the fractional part of ``w / s``, and a regulariser annealed by
``beta`` pushes every ``h(V)`` to exactly 0 or 1 by the end of the optimisation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

ZETA, GAMMA = 1.1, -0.1


def _per_axis(t: torch.Tensor, like: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


class AdaRound(nn.Module):
    """Learned rounding of one weight tensor; ``forward()`` returns the (soft) dequantized weight."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: Optional[int]) -> None:
        super().__init__()
        weight = weight.detach()
        self.register_buffer("scale", _per_axis(scale.to(weight), weight, axis))
        self.register_buffer("zero_point", _per_axis(zero_point.to(weight), weight, axis))
        self.qmin, self.qmax = qmin, qmax
        scaled = weight / self.scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = scaled - self.floor
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def rounding(self) -> torch.Tensor:
        """The soft rounding values ``h(V)`` in [0, 1] (1 = round up)."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def hard_rounding(self) -> torch.Tensor:
        """The binary decision the soft values converge to: 1 where ``h(V) >= 0.5``."""
        return (self.v >= 0).to(self.floor.dtype)

    def _dequantize(self, rounding: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + rounding + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def forward(self) -> torch.Tensor:
        return self._dequantize(self.rounding())

    def hard_weight(self) -> torch.Tensor:
        """The dequantized weight with the binary rounding (what deployment computes)."""
        with torch.no_grad():
            return self._dequantize(self.hard_rounding())

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1| ** beta)``: zero only when every ``h(V)`` is 0 or 1."""
        return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0) -> Optional[float]:
    """Annealing temperature of the regulariser: None (no regularisation) during the first
    ``warmup`` fraction of the steps, then linear from ``start`` down to ``end``."""
    first = int(warmup * total)
    if step < first:
        return None
    return end + (start - end) * max(0.0, 1.0 - (step - first) / max(1, total - first))
