"""One activation quantized at one or more bit widths (PTMQ), each with its own learnable range.

Ranges start from an MSE search over the calibration activations and are then trained
during reconstruction through a fake quantizer whose step size receives gradients (as in
LSQ). The trained range is a pair of multipliers on the initial range, so one learning
rate suits every layer. Deployment and evaluation never use this module's differentiable
path: :meth:`MultiBitActivation.export_range` gives the (min, max) that the quantizer writes into
the wrapper, and the framework's exact fake quantization runs from there.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..compressor.fake_quant import is_symmetric, qparams_from_range, quant_range
from ..compressor.observers import MSEObserver


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def learnable_fake_quant(x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, bits: int, scheme: str,
                         dtype: str) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with the scale from :func:`qparams_from_range`;
    straight-through gradient for ``x`` inside the range, LSQ gradient for the range."""
    scale, zero_point = qparams_from_range(min_val, max_val, bits, scheme, dtype)
    qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
    z = zero_point.to(x.dtype)
    q = torch.clamp(_round_ste(x / scale) + z, qmin, qmax)
    return (q - z) * scale


class MultiBitActivation(nn.Module):
    """Fake quantization of one per-tensor activation at ``bits[level]`` bits."""

    def __init__(self, bits: Sequence[int], scheme: str, dtype: str) -> None:
        super().__init__()
        self.bits: Tuple[int, ...] = tuple(bits)
        self.scheme, self.dtype = scheme, dtype
        self.observer = MSEObserver()
        self.register_buffer("base_min", torch.zeros(len(self.bits)))
        self.register_buffer("base_max", torch.zeros(len(self.bits)))
        self.min_gain = nn.Parameter(torch.ones(len(self.bits)))
        self.max_gain = nn.Parameter(torch.ones(len(self.bits)))

    @property
    def num_levels(self) -> int:
        return len(self.bits)

    def observe(self, x: torch.Tensor) -> None:
        """Collect calibration statistics (before :meth:`init_ranges`)."""
        self.observer.update(x)

    def init_ranges(self) -> None:
        """MSE-optimal range per bit width from the observed activations."""
        with torch.no_grad():
            for i, bits in enumerate(self.bits):
                lo, hi = self.observer.compute_range(bits, self.scheme, self.dtype)
                self.base_min[i], self.base_max[i] = lo, hi
        self.observer = None

    def _level(self, level: int) -> int:
        return min(level, self.num_levels - 1)

    def range(self, level: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The current (trainable) range at ``level``."""
        i = self._level(level)
        return self.base_min[i] * self.min_gain[i], self.base_max[i] * self.max_gain[i]

    def export_range(self, level: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """(bits, min, max) at ``level``, detached, for the wrapper's tracked range."""
        lo, hi = self.range(level)
        return self.bits[self._level(level)], lo.detach(), hi.detach()

    def forward(self, x: torch.Tensor, level: Optional[int], drop_prob: float) -> torch.Tensor:
        """Training-time fake quantization at ``level``, or for ``level=None`` PTMQ's mixed feature
        (a random convex combination of all levels); each element then keeps its float value with
        probability ``drop_prob`` (QDrop)."""
        if level is None and self.num_levels > 1:
            weights = torch.distributions.Dirichlet(torch.ones(self.num_levels)).sample()
            out = sum(w * learnable_fake_quant(x, *self.range(i), b, self.scheme, self.dtype)
                      for i, (w, b) in enumerate(zip(weights.tolist(), self.bits)))
        else:
            i = self._level(level or 0)
            out = learnable_fake_quant(x, *self.range(i), self.bits[i], self.scheme, self.dtype)
        if drop_prob > 0:
            out = torch.where(torch.rand_like(x) < drop_prob, x, out)
        return out
