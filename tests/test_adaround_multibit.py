"""Unit tests of the reconstruction building blocks: ``AdaRound`` (learned weight rounding) and
``MultiBitActivation`` (PTMQ's multi-bit activation quantizer), against numpy formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.quantizers.adaround import AdaRound, beta_schedule
from mixq.quantizers.multibit import MultiBitActivation, learnable_fake_quant


def numpy_qparams(lo: float, hi: float, bits: int, symmetric: bool):
    """Scale and zero point of a range: symmetric int (zero point 0) or affine uint."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return max(-lo, hi) / (2 ** (bits - 1) - 1), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (2 ** bits - 1)
    return scale, int(np.clip(np.round(-lo / scale), 0, 2 ** bits - 1)), 0, 2 ** bits - 1


def numpy_fake_quant(x: np.ndarray, scale: float, zp: int, qmin: int, qmax: int) -> np.ndarray:
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


# ---------------------------------------------------------------------------------------------
# AdaRound
# ---------------------------------------------------------------------------------------------

def per_channel_setup(seed: int = 0, bits: int = 4):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=gen) * 0.1
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1) / qmax * 0.8  # some weights fall outside the grid and clamp
    return w, scale, -qmax - 1, qmax


def test_adaround_starts_at_the_float_weight_and_rounds_to_nearest():
    w, scale, qmin, qmax = per_channel_setup()
    ada = AdaRound(w, scale, torch.zeros(16), qmin, qmax, axis=0)
    s = scale.numpy()[:, None].astype(np.float64)
    wn = w.numpy().astype(np.float64)
    # soft rounding = fractional part of w / s, so the soft weight is w clamped to the grid
    np.testing.assert_allclose(ada.rounding().detach().numpy(), wn / s - np.floor(wn / s), atol=1e-5)
    np.testing.assert_allclose(ada().detach().numpy(), np.clip(wn, qmin * s, qmax * s), atol=1e-6)
    np.testing.assert_allclose(ada.hard_weight().numpy(), numpy_fake_quant(wn, s, 0, qmin, qmax), atol=1e-7)


def test_adaround_affine_grid_and_per_tensor_scale():
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(8, 8, generator=gen) * 3 - 0.5
    scale, zp, qmin, qmax = numpy_qparams(float(w.min()), float(w.max()), 3, symmetric=False)
    ada = AdaRound(w, torch.tensor(scale), torch.tensor(zp), qmin, qmax, axis=None)
    np.testing.assert_allclose(ada.hard_weight().numpy(), numpy_fake_quant(w.numpy().astype(np.float64), scale, zp,
                                                                           qmin, qmax), atol=1e-6)
    with torch.no_grad():
        ada.v.fill_(-50.0)  # every weight rounds down
    expected = (np.clip(np.floor(w.numpy() / np.float32(scale)) + zp, qmin, qmax) - zp) * scale
    np.testing.assert_allclose(ada.hard_weight().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(ada().detach().numpy(), expected, atol=1e-6)  # h(V) saturates at exactly 0


def test_regularizer_formula_and_its_zeros():
    w, scale, qmin, qmax = per_channel_setup(1)
    ada = AdaRound(w, scale, torch.zeros(16), qmin, qmax, axis=0)
    h = ada.rounding().detach().numpy().astype(np.float64)
    for beta in (20.0, 2.0):
        assert ada.regularizer(beta).item() == pytest.approx((1 - np.abs(2 * h - 1) ** beta).sum(), rel=1e-5)
    with torch.no_grad():
        ada.v.copy_(torch.where(torch.rand_like(ada.v) < 0.5, -20.0, 20.0))
    assert ada.regularizer(2.0).item() == 0.0
    assert set(np.unique(ada.rounding().detach().numpy())) <= {0.0, 1.0}


@pytest.mark.parametrize("total, warmup", [(100, 0.2), (7, 0.0)])
def test_beta_schedule(total, warmup):
    first = int(warmup * total)
    for step in range(total):
        beta = beta_schedule(step, total, warmup)
        if step < first:
            assert beta is None
        else:
            assert beta == pytest.approx(2.0 + 18.0 * (1 - (step - first) / (total - first)))
    assert beta_schedule(first, total, warmup) == pytest.approx(20.0)


def test_learned_rounding_beats_nearest_on_the_layer_output():
    """AdaRound's objective: the layer's output error on data, not the weight error."""
    torch.manual_seed(0)
    w, scale, qmin, qmax = per_channel_setup(3)
    x = torch.randn(256, 32)
    ada = AdaRound(w, scale, torch.zeros(16), qmin, qmax, axis=0)
    nearest = ada.hard_weight()
    reference = x @ w.t()
    optimizer = torch.optim.Adam(ada.parameters(), lr=1e-2)
    total = 400
    for step in range(total):
        beta = beta_schedule(step, total, 0.2)
        loss = ((x @ ada().t() - reference) ** 2).mean()
        if beta is not None:
            loss = loss + 0.1 * ada.regularizer(beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hard = ada.hard_weight()
    h = ada.rounding().detach()
    assert ((h < 0.05) | (h > 0.95)).float().mean() > 0.97  # the regulariser made the rounding (nearly) binary
    codes = hard / scale[:, None]
    torch.testing.assert_close(codes, torch.round(codes))  # still on the grid
    assert ((x @ hard.t() - reference) ** 2).mean() < 0.97 * ((x @ nearest.t() - reference) ** 2).mean()


# ---------------------------------------------------------------------------------------------
# MultiBitActivation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, symmetric", [(3, False), (4, True), (8, False)])
def test_learnable_fake_quant_forward_is_the_integer_grid(bits, symmetric):
    x = torch.randn(1000) * 2 + 0.3
    lo, hi = torch.tensor(-1.5), torch.tensor(2.5)
    scheme, dtype = ("per_tensor_symmetric", "int") if symmetric else ("per_tensor_affine", "uint")
    out = learnable_fake_quant(x, lo, hi, bits, scheme, dtype)
    scale, zp, qmin, qmax = numpy_qparams(-1.5, 2.5, bits, symmetric)
    np.testing.assert_allclose(out.numpy(), numpy_fake_quant(x.numpy().astype(np.float64), scale, zp, qmin, qmax),
                               atol=1e-5)


def test_learnable_fake_quant_gradients_are_ste_and_lsq():
    x = torch.linspace(-3, 3, 601, dtype=torch.float64).requires_grad_()
    hi = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = learnable_fake_quant(x, -hi, hi, 4, "per_tensor_symmetric", "int")
    out.sum().backward()
    scale, _, qmin, qmax = numpy_qparams(-2.0, 2.0, 4, True)
    codes = x.detach().numpy() / scale
    inside = (np.round(codes) >= qmin) & (np.round(codes) <= qmax)
    np.testing.assert_array_equal(x.grad.numpy(), inside.astype(np.float64))  # straight-through inside the grid
    # LSQ: d out / d scale = round(x/s) - x/s inside, the clamped code outside; scale = hi / qmax
    d_scale = np.where(inside, np.round(codes) - codes, np.clip(np.round(codes), qmin, qmax))
    assert hi.grad.item() == pytest.approx(d_scale.sum() / qmax, rel=1e-6)


def test_multibit_ranges_minimize_the_error_per_width():
    torch.manual_seed(0)
    x = torch.randn(4096)
    act = MultiBitActivation((3, 4, 8), "per_tensor_affine", "uint")
    act.observe(x)
    act.init_ranges()
    xs = x.numpy().astype(np.float64)

    def mse(lo, hi, bits):
        scale, zp, qmin, qmax = numpy_qparams(lo, hi, bits, False)
        return ((numpy_fake_quant(xs, scale, zp, qmin, qmax) - xs) ** 2).mean()

    widths = []
    for level, bits in enumerate(act.bits):
        got_bits, lo, hi = act.export_range(level)
        assert got_bits == bits
        assert mse(lo.item(), hi.item(), bits) <= mse(xs.min(), xs.max(), bits)
        widths.append(hi.item() - lo.item())
    assert widths[0] < widths[1] < widths[2] <= xs.max() - xs.min() + 1e-6  # fewer bits clip harder
    assert mse(*[v.item() for v in act.export_range(0)[1:]], 3) < 0.5 * mse(xs.min(), xs.max(), 3)


def test_multibit_levels_gains_and_drop():
    torch.manual_seed(0)
    x = torch.randn(2000)
    act = MultiBitActivation((2, 4, 8), "per_tensor_symmetric", "int")
    act.observe(x)
    act.init_ranges()
    with torch.no_grad():
        act.max_gain[1] = 0.5
        act.min_gain[1] = 0.5
    bits, lo, hi = act.export_range(1)
    assert (bits, lo.item(), hi.item()) == (4, act.base_min[1].item() * 0.5, act.base_max[1].item() * 0.5)
    outs = []
    for level, bits in enumerate(act.bits):
        lo, hi = act.range(level)
        scale, zp, qmin, qmax = numpy_qparams(lo.item(), hi.item(), bits, True)
        expected = numpy_fake_quant(x.numpy().astype(np.float64), scale, zp, qmin, qmax)
        out = act(x, level, 0.0).detach().numpy()
        np.testing.assert_allclose(out, expected, atol=1e-5)
        outs.append(out)
    np.testing.assert_array_equal(act(x, 7, 0.0).detach().numpy(), outs[-1])  # past the top: the top level
    mixed = act(x, None, 0.0).detach().numpy()  # PTMQ's mixed feature: a convex combination of the levels
    assert (mixed >= np.min(outs, 0) - 1e-6).all() and (mixed <= np.max(outs, 0) + 1e-6).all()
    assert not any(np.allclose(mixed, o) for o in outs)
    torch.testing.assert_close(act(x, 0, 1.0), x)  # QDrop with probability 1 keeps every float value
    kept = (act(x, 0, 0.5).detach().numpy() == x.numpy()) & (outs[0] != x.numpy())
    assert 0.4 < kept.sum() / (outs[0] != x.numpy()).sum() < 0.6
