"""Range observers: modules that watch tensors and propose a quantization range.

Each observer has one contract: ``update(x)`` (or call it: ``observer(x)`` returns ``x``) any
number of times, then ``compute_range(bits, scheme, dtype) -> (min_val, max_val)`` or
``calculate_qparams(bits, scheme, dtype) -> (scale, zero_point)``. ``axis=None`` observes a
whole tensor (activations); an integer axis keeps one range per slice along it (per-channel
weights).

Observers are ``nn.Module``s whose statistics are buffers: they are in the ``state_dict`` of the
module holding them and follow ``.to(device)``. Before any data the range is ``(+inf, -inf)``;
loading a ``state_dict`` adopts its channel count, while a histogram with another bin count is an
error naming the fix.

Calibration split across ``torch.distributed`` ranks calls ``merge_across_ranks()`` on every
rank (a collective) before ``compute_range``: the observer then holds the statistics of all
ranks' data: min/max exactly, histograms re-binned onto the global range and summed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

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


class Observer(nn.Module):
    """Base class: tracks the running min/max of everything it saw (buffers ``min_val`` /
    ``max_val``, ``+inf`` / ``-inf`` until the first tensor)."""

    # buffers whose shape follows the data (and a loaded state_dict)
    _data_shaped: Tuple[str, ...] = ("min_val", "max_val")

    def __init__(self, axis: Optional[int] = None) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def extra_repr(self) -> str:
        return f"axis={self.axis}"

    @property
    def has_data(self) -> bool:
        """Whether the observer has seen a tensor (or loaded the state of one that had)."""
        return bool(torch.isfinite(self.min_val).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` and return it unchanged."""
        self.update(x)
        return x

    def update(self, x: torch.Tensor) -> None:
        """Observe one tensor."""
        lo, hi = _minmax(x, self.axis)
        self.min_val = torch.minimum(self.min_val.to(lo.device), lo).to(self.min_val.dtype)
        self.max_val = torch.maximum(self.max_val.to(hi.device), hi).to(self.max_val.dtype)

    def merge_across_ranks(self) -> None:
        """Hold the min/max of every rank's data (a collective: every rank calls it, in the same
        order); a rank that saw nothing contributes nothing."""
        lo, hi = all_reduce_range(self.min_val, self.max_val, f"merging {type(self).__name__} ranges")
        if bool(torch.isfinite(lo).all()):
            self.min_val, self.max_val = lo, hi

    def _check(self) -> None:
        if not self.has_data:
            raise RuntimeError(f"{type(self).__name__} saw no data: run calibration forwards before compress()")

    def compute_range(self, bits: int, scheme: str, dtype: str) -> Range:
        """The range to quantize with."""
        self._check()
        return self.min_val, self.max_val

    def calculate_qparams(self, bits: int, scheme: str, dtype: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of :meth:`compute_range` on the ``bits``-bit grid (the one
        formula, :func:`~mixq.compressor.fake_quant.qparams_from_range`)."""
        lo, hi = self.compute_range(bits, scheme, dtype)
        return qparams_from_range(lo, hi, bits, scheme, dtype)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        for name in self._data_shaped:
            value = state_dict.get(prefix + name)
            if not torch.is_tensor(value) or value.shape == getattr(self, name).shape:
                continue
            if name != "tensor" and self.axis is None and value.dim() != 0:
                error_msgs.append(f"{prefix}{name}: the checkpoint holds {value.numel()} per-channel values, this "
                                  f"{type(self).__name__} observes whole tensors (axis=None); build the quantizer with "
                                  "the checkpoint's quant_scheme")
                continue
            current = getattr(self, name)
            setattr(self, name, torch.empty(value.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class MinMaxObserver(Observer):
    """The full range of all observed values."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (``decay`` weight on the history)."""

    def __init__(self, axis: Optional[int] = None, decay: float = 0.99) -> None:
        super().__init__(axis)
        self.decay = decay

    def update(self, x: torch.Tensor) -> None:
        lo, hi = _minmax(x, self.axis)
        if not self.has_data:
            self.min_val, self.max_val = lo.to(self.min_val.dtype), hi.to(self.max_val.dtype)
        else:
            self.min_val = self.decay * self.min_val + (1 - self.decay) * lo.to(self.min_val.device)
            self.max_val = self.decay * self.max_val + (1 - self.decay) * hi.to(self.max_val.device)

    def merge_across_ranks(self) -> None:
        """The mean over ranks of their moving averages (an EMA of another rank's batches cannot be
        replayed; ranks that saw nothing do not count). Per-channel observers hold a weight,
        identical on every rank: left as they are."""
        if self.axis is not None:
            return
        stats = torch.zeros(3)
        if self.has_data:
            stats = torch.stack([self.min_val.cpu().float(), self.max_val.cpu().float(), torch.tensor(1.0)])
        total = all_reduce_sum(stats, "merging MovingAverageMinMaxObserver ranges")
        if total[2] > 0:
            device, dtype = self.min_val.device, self.min_val.dtype
            self.min_val = (total[0] / total[2]).to(device, dtype)
            self.max_val = (total[1] / total[2]).to(device, dtype)


class _HistogramObserver(Observer):
    """Keeps a histogram of per-tensor data (buffer ``hist``, re-binned when the range grows;
    all zeros until the data has a range) or, per channel, the last observed tensor (buffer
    ``tensor``; weights are observed once)."""

    _data_shaped = ("min_val", "max_val", "tensor")

    def __init__(self, axis: Optional[int] = None, bins: int = 2048) -> None:
        super().__init__(axis)
        self.bins = bins
        self.register_buffer("hist", torch.zeros(bins))
        self.register_buffer("tensor", torch.empty(0))

    def extra_repr(self) -> str:
        return f"axis={self.axis}, bins={self.bins}"

    def _has_histogram(self) -> bool:
        return bool(self.hist.sum() > 0)

    def update(self, x: torch.Tensor) -> None:
        old_lo, old_hi = self.min_val, self.max_val
        super().update(x)
        x = x.detach().float()
        if self.axis is not None:
            self.tensor = x.to(self.tensor.dtype)
            return
        lo, hi = self.min_val.item(), self.max_val.item()
        if hi <= lo:
            return
        new = torch.histc(x, self.bins, lo, hi)
        if old_hi.item() > old_lo.item():
            new += self._rebin(old_lo.item(), old_hi.item(), lo, hi).to(new.device)
        self.hist = new.to(self.hist.dtype)

    def _rebin(self, old_lo: float, old_hi: float, lo: float, hi: float) -> torch.Tensor:
        """``self.hist`` (over ``[old_lo, old_hi]``) moved onto ``bins`` bins over ``[lo, hi]``
        (each old bin's count goes to the new bin holding its centre)."""
        idx = ((self._centers(old_lo, old_hi) - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
        return torch.zeros_like(self.hist).scatter_add_(0, idx.to(self.hist.device), self.hist)

    def merge_across_ranks(self) -> None:
        """Min/max over ranks, then every rank's histogram re-binned onto that common range and
        summed (per-channel observers hold a weight, identical on every rank: min/max only)."""
        old = (self.min_val.item(), self.max_val.item()) if self.has_data else None
        super().merge_across_ranks()
        if self.axis is not None or not self.has_data or self.max_val.item() <= self.min_val.item():
            return
        lo, hi = self.min_val.item(), self.max_val.item()
        local = torch.zeros(self.bins)
        if old is not None and old[1] > old[0]:
            local = self._rebin(old[0], old[1], lo, hi).cpu().float()
        self.hist = all_reduce_sum(local, f"merging {type(self).__name__} histograms").to(self.hist)

    def _centers(self, lo: float, hi: float) -> torch.Tensor:
        width = (hi - lo) / self.bins
        return lo + width * (torch.arange(self.bins, dtype=torch.float32) + 0.5)

    def _per_channel_rows(self) -> torch.Tensor:
        return self.tensor.transpose(0, self.axis).reshape(self.tensor.shape[self.axis], -1)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        hist = state_dict.get(prefix + "hist")
        if torch.is_tensor(hist) and hist.shape != self.hist.shape:
            error_msgs.append(f"{prefix}hist: the checkpoint's histogram has {hist.numel()} bins, this "
                              f"{type(self).__name__} has {self.bins}; build it with bins={hist.numel()}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


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
        if not self._has_histogram():
            return self.min_val, self.max_val
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        edges = self._centers(self.min_val.item(), self.max_val.item()).to(self.min_val)
        lo = edges[int(torch.searchsorted(cdf, torch.tensor(1 - p, dtype=cdf.dtype)).clamp(max=self.bins - 1))]
        hi = edges[int(torch.searchsorted(cdf, torch.tensor(p, dtype=cdf.dtype)).clamp(max=self.bins - 1))]
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
        elif not self._has_histogram():
            return self.min_val, self.max_val
        else:
            values = self._centers(self.min_val.item(), self.max_val.item()).unsqueeze(0).to(self.hist)
            weights = self.hist.unsqueeze(0)
        qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
        best_err = torch.full((values.shape[0],), float("inf"), device=values.device)
        best_lo, best_hi = self.min_val.clone().reshape(-1), self.max_val.clone().reshape(-1)
        for k in range(1, self.grid + 1):
            alpha = k / self.grid
            lo, hi = alpha * self.min_val.reshape(-1), alpha * self.max_val.reshape(-1)
            scale, zp = qparams_from_range(lo, hi, bits, scheme, dtype)
            scale, zp = scale.to(values.device), zp.to(values.device)
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


def make_observer(spec: Any, axis: Optional[int] = None) -> Observer:
    """Build an observer from a name (``'mse'``) or a dict (``{'name': 'percentile', 'percentile': 99.9}``)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    cls = OBSERVERS[spec.pop("name")]
    return cls(axis=axis, **spec)
