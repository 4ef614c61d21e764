"""Observers against numpy references on known data."""
import numpy as np
import pytest
import torch

from mixq.compressor import (MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, NonFiniteTensorError,
                             PercentileObserver)
from mixq.compressor.fake_quant import qparams_from_range

RNG = np.random.default_rng(0)
BATCHES = [RNG.standard_normal(20000).astype(np.float32) * (1 + i) for i in range(3)]


def test_minmax_is_global_range():
    obs = MinMaxObserver()
    for b in BATCHES:
        obs.update(torch.from_numpy(b))
    lo, hi = obs.compute_range(8, "per_tensor_affine", "int")
    everything = np.concatenate(BATCHES)
    assert lo.item() == everything.min() and hi.item() == everything.max()


def test_moving_average_follows_ema_formula():
    obs = MovingAverageMinMaxObserver(decay=0.9)
    ref_lo = ref_hi = None
    for b in BATCHES:
        obs.update(torch.from_numpy(b))
        ref_lo = b.min() if ref_lo is None else 0.9 * ref_lo + 0.1 * b.min()
        ref_hi = b.max() if ref_hi is None else 0.9 * ref_hi + 0.1 * b.max()
    lo, hi = obs.compute_range(8, "per_tensor_affine", "int")
    assert lo.item() == pytest.approx(ref_lo, rel=1e-5) and hi.item() == pytest.approx(ref_hi, rel=1e-5)


def test_per_channel_minmax():
    w = torch.from_numpy(RNG.standard_normal((4, 3, 2, 2)).astype(np.float32))
    obs = MinMaxObserver(axis=0)
    obs.update(w)
    lo, hi = obs.compute_range(8, "per_channel_symmetric", "int")
    np.testing.assert_array_equal(lo.numpy(), w.numpy().reshape(4, -1).min(1))
    np.testing.assert_array_equal(hi.numpy(), w.numpy().reshape(4, -1).max(1))


def test_percentile_matches_numpy_within_a_bin():
    obs = PercentileObserver(percentile=99.0, bins=4096)
    for b in BATCHES:
        obs.update(torch.from_numpy(b))
    everything = np.concatenate(BATCHES)
    lo, hi = obs.compute_range(8, "per_tensor_affine", "int")
    bin_width = (everything.max() - everything.min()) / 4096
    assert abs(hi.item() - np.percentile(everything, 99.0)) < 3 * bin_width
    assert abs(lo.item() - np.percentile(everything, 1.0)) < 3 * bin_width


def _mse(x, lo, hi, bits):
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, "per_tensor_symmetric", "int")
    s = float(scale)
    q = np.clip(np.rint(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return float(((q * s - x) ** 2).sum())


def test_mse_observer_finds_the_grid_optimum_and_beats_minmax():
    x = np.concatenate([RNG.standard_normal(50000), [40.0, -35.0]]).astype(np.float32)  # heavy outliers
    obs = MSEObserver(grid=50)
    obs.update(torch.from_numpy(x))
    lo, hi = obs.compute_range(4, "per_tensor_symmetric", "int")
    errors = {k: _mse(x, -35.0 * k / 50, 40.0 * k / 50, 4) for k in range(1, 51)}
    best_k = min(errors, key=errors.get)
    assert hi.item() == pytest.approx(40.0 * best_k / 50, rel=0.05)
    assert _mse(x, lo.item(), hi.item(), 4) < 0.5 * _mse(x, -35.0, 40.0, 4)


def test_mse_per_channel_weights():
    w = torch.from_numpy(RNG.standard_normal((3, 500)).astype(np.float32))
    w[1, 0] = 30.0
    obs = MSEObserver(axis=0, grid=40)
    obs.update(w)
    lo, hi = obs.compute_range(4, "per_channel_symmetric", "int")
    assert hi[1] < 30.0 * 0.9  # the outlier channel is clipped
    for c in range(3):
        mine = _mse(w[c].numpy(), lo[c].item(), hi[c].item(), 4)
        full = _mse(w[c].numpy(), w[c].min().item(), w[c].max().item(), 4)
        assert mine <= full + 1e-6


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver])
def test_nan_data_is_rejected(cls):
    with pytest.raises(NonFiniteTensorError, match="NaN"):
        cls().update(torch.tensor([1.0, float("nan")]))


def test_observer_without_data_says_so():
    with pytest.raises(RuntimeError, match="saw no data"):
        MinMaxObserver().compute_range(8, "per_tensor_affine", "int")
