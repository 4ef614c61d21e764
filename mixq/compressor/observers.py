"""Range observers: they watch tensors and propose a quantization range.

Each observer has one contract: ``update(x)`` any number of times, then
``compute_range(bits, scheme, dtype) -> (min_val, max_val)``. ``axis=None`` observes a whole
tensor (activations); an integer axis keeps one range per slice along it (per-channel weights).

Calibration split across ``torch.distributed`` ranks calls ``merge_across_ranks()`` on every
rank (a collective) before ``compute_range``: the observer then holds the statistics of all
ranks' data: min/max exactly, histograms re-binned onto the global range and summed.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch

from .distributed import all_reduce_range, all_reduce_sum
from .fake_quant import is_integer_bits, qparams_from_range, quant_range, quantize, dequantize, is_symmetric

Range = Tuple[torch.Tensor, torch.Tensor]


class NonFiniteTensorError(ValueError):
    """A tensor to observe contains NaN or infinity."""


def _minmax(x: torch.Tensor, axis: Optional[int]) -> Range:
    x = x.detach()
    if axis is None:
        lo, hi = torch.aminmax(x)
    else:
        lo, hi = torch.aminmax(x.transpose(0, axis).reshape(x.shape[axis], -1), dim=1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise NonFiniteTensorError("tensor contains NaN or infinity; check the data fed to the model")
    return lo.float(), hi.float()


class Observer:
    """Base class: tracks the running min/max of everything it saw."""

    def __init__(self, axis: Optional[int] = None) -> None:
        self.axis = axis
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        """Observe one tensor."""
        lo, hi = _minmax(x, self.axis)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def merge_across_ranks(self) -> None:
        """Hold the min/max of every rank's data (a collective: every rank calls it, in the same
        order); a rank that saw nothing contributes nothing."""
        lo, hi = (self.min_val, self.max_val) if self.min_val is not None else (
            torch.tensor(float("inf")), torch.tensor(float("-inf")))
        lo, hi = all_reduce_range(lo, hi, f"merging {type(self).__name__} ranges")
        if bool(torch.isfinite(lo).all()):
            self.min_val, self.max_val = lo, hi

    def _check(self) -> None:
        if self.min_val is None:
            raise RuntimeError(f"{type(self).__name__} saw no data: run calibration forwards before compress()")

    def compute_range(self, bits: int, scheme: str, dtype: str) -> Range:
        """The range to quantize with."""
        self._check()
        return self.min_val, self.max_val


class MinMaxObserver(Observer):
    """The full range of all observed values."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (``decay`` weight on the history)."""

    def __init__(self, axis: Optional[int] = None, decay: float = 0.99) -> None:
        super().__init__(axis)
        self.decay = decay

    def update(self, x: torch.Tensor) -> None:
        lo, hi = _minmax(x, self.axis)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.decay * self.min_val + (1 - self.decay) * lo
            self.max_val = self.decay * self.max_val + (1 - self.decay) * hi

    def merge_across_ranks(self) -> None:
        """The mean over ranks of their moving averages (an EMA of another rank's batches cannot be
        replayed; ranks that saw nothing do not count). Per-channel observers hold a weight,
        identical on every rank: left as they are."""
        if self.axis is not None:
            return
        stats = torch.zeros(3)
        if self.min_val is not None:
            stats = torch.stack([self.min_val.cpu(), self.max_val.cpu(), torch.tensor(1.0)])
        total = all_reduce_sum(stats, "merging MovingAverageMinMaxObserver ranges")
        if total[2] > 0:
            device = self.min_val.device if self.min_val is not None else torch.device("cpu")
            self.min_val, self.max_val = (total[0] / total[2]).to(device), (total[1] / total[2]).to(device)


class _HistogramObserver(Observer):
    """Keeps a histogram of per-tensor data (re-binned when the range grows) or, per channel,
    the last observed tensor (weights are observed once)."""

    def __init__(self, axis: Optional[int] = None, bins: int = 2048) -> None:
        super().__init__(axis)
        self.bins = bins
        self.hist: Optional[torch.Tensor] = None
        self.tensor: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        old_lo, old_hi = self.min_val, self.max_val
        super().update(x)
        x = x.detach().float()
        if self.axis is not None:
            self.tensor = x
            return
        lo, hi = self.min_val.item(), self.max_val.item()
        if hi <= lo:
            return
        new = torch.histc(x, self.bins, lo, hi)
        if self.hist is not None and old_hi.item() > old_lo.item():
            new += self._rebin(old_lo.item(), old_hi.item(), lo, hi)
        self.hist = new

    def _rebin(self, old_lo: float, old_hi: float, lo: float, hi: float) -> torch.Tensor:
        """``self.hist`` (over ``[old_lo, old_hi]``) moved onto ``bins`` bins over ``[lo, hi]``
        (each old bin's count goes to the new bin holding its centre)."""
        idx = ((self._centers(old_lo, old_hi) - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
        return torch.zeros(self.bins, device=self.hist.device).scatter_add_(0, idx.to(self.hist.device), self.hist)

    def merge_across_ranks(self) -> None:
        """Min/max over ranks, then every rank's histogram re-binned onto that common range and
        summed (per-channel observers hold a weight, identical on every rank: min/max only)."""
        old = (self.min_val.item(), self.max_val.item()) if self.min_val is not None else None
        super().merge_across_ranks()
        if self.axis is not None or self.min_val is None or self.max_val.item() <= self.min_val.item():
            return
        lo, hi = self.min_val.item(), self.max_val.item()
        local = torch.zeros(self.bins)
        if self.hist is not None and old is not None and old[1] > old[0]:
            local = self._rebin(old[0], old[1], lo, hi)
        self.hist = all_reduce_sum(local, f"merging {type(self).__name__} histograms")

    def _centers(self, lo: float, hi: float) -> torch.Tensor:
        width = (hi - lo) / self.bins
        return lo + width * (torch.arange(self.bins, dtype=torch.float32) + 0.5)

    def _per_channel_rows(self) -> torch.Tensor:
        return self.tensor.transpose(0, self.axis).reshape(self.tensor.shape[self.axis], -1)


class PercentileObserver(_HistogramObserver):
    """Clips the ``(100 - percentile)``% tails: range = [q(1 - p), q(p)] of the observed values."""

    def __init__(self, axis: Optional[int] = None, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(axis, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def compute_range(self, bits: int, scheme: str, dtype: str) -> Range:
        self._check()
        p = self.percentile / 100.0
        if self.axis is not None:
            rows = self._per_channel_rows()
            lo = torch.quantile(rows, 1 - p, dim=1)
            hi = torch.quantile(rows, p, dim=1)
            return lo, hi
        if self.hist is None:
            return self.min_val, self.max_val
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        edges = self._centers(self.min_val.item(), self.max_val.item())
        lo = edges[int(torch.searchsorted(cdf, torch.tensor(1 - p)).clamp(max=self.bins - 1))]
        hi = edges[int(torch.searchsorted(cdf, torch.tensor(p)).clamp(max=self.bins - 1))]
        return torch.minimum(lo, self.max_val), torch.maximum(hi, self.min_val)


class MSEObserver(_HistogramObserver):
    """Searches ``grid`` clipping ranges ``alpha * [min, max]`` (alpha in (0, 1]) and keeps the one
    with the least squared quantization error over the observed values (per channel for weights)."""

    def __init__(self, axis: Optional[int] = None, grid: int = 100, bins: int = 2048) -> None:
        super().__init__(axis, bins)
        self.grid = grid

    def compute_range(self, bits: int, scheme: str, dtype: str) -> Range:
        self._check()
        if not is_integer_bits(bits):
            return self.min_val, self.max_val
        if self.axis is not None:
            values, weights = self._per_channel_rows(), None
        elif self.hist is None:
            return self.min_val, self.max_val
        else:
            values = self._centers(self.min_val.item(), self.max_val.item()).unsqueeze(0)
            weights = self.hist.unsqueeze(0)
        qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
        best_err = torch.full((values.shape[0],), float("inf"))
        best_lo, best_hi = self.min_val.clone().reshape(-1), self.max_val.clone().reshape(-1)
        for k in range(1, self.grid + 1):
            alpha = k / self.grid
            lo, hi = alpha * self.min_val.reshape(-1), alpha * self.max_val.reshape(-1)
            scale, zp = qparams_from_range(lo, hi, bits, scheme, dtype)
            deq = dequantize(quantize(values, scale, zp, qmin, qmax, axis=0), scale, zp, axis=0)
            sq = (deq - values) ** 2
            err = (sq * weights).sum(1) if weights is not None else sq.sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        if self.axis is None:
            return best_lo[0], best_hi[0]
        return best_lo, best_hi


OBSERVERS: Dict[str, Type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(spec, axis: Optional[int] = None) -> Observer:
    """Build an observer from a name (``'mse'``) or a dict (``{'name': 'percentile', 'percentile': 99.9}``)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    cls = OBSERVERS[spec.pop("name")]
    return cls(axis=axis, **spec)
