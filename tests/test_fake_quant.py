"""Fake-quant maths against an independent numpy reference, and the straight-through gradient."""
import itertools

import numpy as np
import pytest
import torch

from mixq.compressor import QuantGrad, qparams_from_range, quant_range
from mixq.compressor.fake_quant import dequantize, quantize

SCHEMES = ["per_tensor_symmetric", "per_tensor_affine"]


def np_reference(x, lo, hi, bits, scheme, dtype):
    """dequantize(quantize(x)) written from the formulas in DESIGN.md; the division is float32,
    as in ONNX QuantizeLinear."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if dtype == "uint":
        qmin, qmax = 0, 2 ** bits - 1
    else:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if scheme.endswith("symmetric"):
        scale = max(-lo, hi) / (2 ** (bits - 1) - 1)
        zp = 0 if dtype == "int" else 2 ** (bits - 1)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = None
    scale = max(np.float32(scale), np.finfo(np.float32).eps)
    if zp is None:
        zp = int(np.clip(qmin - np.rint(lo / scale), qmin, qmax))
    q = np.clip(np.rint(x / np.float32(scale)) + zp, qmin, qmax)
    return (q - zp) * np.float32(scale), q


@pytest.mark.parametrize("bits,scheme,dtype", list(itertools.product(range(2, 9), SCHEMES, ["int", "uint"])))
def test_fake_quant_matches_numpy(bits, scheme, dtype):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(4000) * 2).astype(np.float32)
    lo, hi = -1.5, 3.0  # narrower than the data: exercises both clamp edges
    x = np.concatenate([x, np.array([lo, hi, 0.0, -100.0, 100.0], np.float32)])
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, scheme, dtype)
    qmin, qmax = quant_range(bits, dtype, scheme.endswith("symmetric"))
    xt = torch.from_numpy(x)
    q = quantize(xt, scale, zp, qmin, qmax)
    out = QuantGrad.apply(xt, scale, zp, qmin, qmax, None)
    ref, ref_q = np_reference(x, lo, hi, bits, scheme, dtype)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert q.min() >= qmin and q.max() <= qmax
    # zero is exactly representable on every grid
    assert QuantGrad.apply(torch.zeros(1), scale, zp, qmin, qmax, None).item() == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_symmetric_matches_numpy(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    wt = torch.from_numpy(w)
    lo, hi = torch.aminmax(wt.reshape(6, -1), dim=1)
    scale, zp = qparams_from_range(lo, hi, bits, "per_channel_symmetric", "int")
    qmin, qmax = quant_range(bits, "int", True)
    out = QuantGrad.apply(wt, scale, zp, qmin, qmax, 0).numpy()
    for c in range(6):
        ref, _ = np_reference(w[c], float(lo[c]), float(hi[c]), bits, "per_tensor_symmetric", "int")
        np.testing.assert_allclose(out[c], ref, rtol=1e-6, atol=1e-7)


def test_symmetric_uint_is_int_grid_shifted():
    x = torch.linspace(-3, 3, 101)
    s_i, z_i = qparams_from_range(torch.tensor(-2.0), torch.tensor(2.5), 8, "per_tensor_symmetric", "int")
    s_u, z_u = qparams_from_range(torch.tensor(-2.0), torch.tensor(2.5), 8, "per_tensor_symmetric", "uint")
    assert s_i == s_u and z_i == 0 and z_u == 128
    qi = quantize(x, s_i, z_i, -128, 127)
    qu = quantize(x, s_u, z_u, 0, 255)
    assert torch.equal(qu - 128, qi)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("value", [0.0, 2.5, -1.25])
def test_zero_width_and_constant_ranges(scheme, value):
    x = torch.full((10,), value)
    scale, zp = qparams_from_range(x.min(), x.max(), 8, scheme, "int")
    assert scale > 0 and torch.isfinite(scale)
    out = QuantGrad.apply(x, scale, zp, -128, 127, None)
    # a constant tensor is reproduced to within half a step, zeros exactly
    assert torch.allclose(out, x, atol=float(scale) / 2 + 1e-7)
    if value == 0.0:
        assert torch.equal(out, x)


def test_nan_range_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        qparams_from_range(torch.tensor(float("nan")), torch.tensor(1.0), 8, "per_tensor_affine", "int")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_straight_through_gradient(scheme):
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 8, scheme, "int")
    rmin = float((-128 - zp) * scale)
    rmax = float((127 - zp) * scale)
    x = torch.tensor([rmin - 0.5, rmin + 1e-3, 0.0, 0.3, rmax - 1e-3, rmax + 0.5], requires_grad=True)
    g = torch.arange(1.0, 7.0)
    QuantGrad.apply(x, scale, zp, -128, 127, None).backward(g)
    inside = torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.float32)
    assert torch.equal(x.grad, g * inside)


def test_dequantize_inverts_quantize_on_grid():
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), 4, "per_tensor_affine", "uint")
    q = torch.arange(0, 16, dtype=torch.float32)
    assert torch.equal(quantize(dequantize(q, scale, zp), scale, zp, 0, 15), q)
