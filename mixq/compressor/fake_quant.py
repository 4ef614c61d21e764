"""Quantization maths shared by every quantizer and by the speedup frontend.

One function turns a tracked range into (scale, zero_point); one simulates
``dequantize(quantize(x))``. Deployment uses the same two functions, so what a
quantizer simulates is exactly what the engine computes.

Grids (``b`` bits):

* symmetric ``int``:  q in [-2^(b-1), 2^(b-1)-1], zero point 0, scale = amax / (2^(b-1)-1)
* symmetric ``uint``: q in [0, 2^b-1], zero point 2^(b-1), same scale (== the int grid + 2^(b-1))
* affine ``int`` / ``uint``: the range is widened to contain 0, scale = (max-min)/(qmax-qmin),
  zero point = qmin - round(min/scale), clamped to the grid.

Bit widths above 8 are not integer grids in deployment: 16 bits is simulated as an fp16
round trip and 32 bits (or more than 16) is the identity.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .scheme import Scheme

DTYPES = ("int", "uint")
MAX_INT_BITS = 8
FP16_BITS = 16
_EPS = torch.finfo(torch.float32).eps


def is_symmetric(scheme: str) -> bool:
    """True for the two symmetric schemes (:attr:`Scheme.symmetric`)."""
    return Scheme(scheme).symmetric


def is_per_channel(scheme: str) -> bool:
    """True for the two per-channel schemes (:attr:`Scheme.per_channel`)."""
    return Scheme(scheme).per_channel


def is_integer_bits(bits: int) -> bool:
    """Bit widths simulated on an integer grid (1..8); wider types are float in deployment."""
    return 1 <= bits <= MAX_INT_BITS


def quant_range(bits: int, dtype: str, symmetric: bool) -> Tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` for a bit width and dtype."""
    if dtype == "uint":
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, scheme: str,
                       dtype: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) for the range ``[min_val, max_val]``.

    ``min_val``/``max_val`` are 0-d tensors for per-tensor schemes and 1-d for per-channel.
    A zero-width range gives the smallest positive scale, so zeros stay exact.
    """
    if not is_integer_bits(bits):
        raise ValueError(f"{bits}-bit quantization has no integer grid; only 1..{MAX_INT_BITS} bits do")
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if torch.isnan(min_val).any() or torch.isnan(max_val).any():
        raise ValueError("cannot quantize a range containing NaN; check the calibration data for NaN")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
    if is_symmetric(scheme):
        if bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits; use an affine scheme for 1 bit")
        amax = torch.maximum(-min_neg, max_pos)
        scale = amax / float(2 ** (bits - 1) - 1)
        zero_point = torch.full_like(scale, 0 if dtype == "int" else 2 ** (bits - 1), dtype=torch.int64)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int64)
    scale = torch.clamp(scale, min=_EPS)
    return scale, zero_point


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: Optional[int] = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (round half to even)."""
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis).to(x.dtype)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: Optional[int] = None) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale``."""
    s = _broadcast(scale, q, axis)
    z = _broadcast(zero_point, q, axis).to(s.dtype)
    return (q.to(s.dtype) - z) * s


class QuantGrad(torch.autograd.Function):
    """Fake quantization with a straight-through gradient.

    Forward: ``dequantize(quantize(x))``, computed as ``round(clamp(x, rmin, rmax) / scale) * scale``
    with ``[rmin, rmax] = [(qmin - zp) * scale, (qmax - zp) * scale]``; this equals
    ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` (rounding before adding the zero
    point, as ONNX QuantizeLinear does) in fewer passes over the tensor.
    Backward: the incoming gradient where ``rmin <= x <= rmax``, zero outside.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int, axis: Optional[int] = None) -> torch.Tensor:
        if scale.numel() == 1 and x.device.type == "cpu":
            # Python-scalar bounds take PyTorch's fast CPU kernels (about 10x faster than 0-d tensors)
            s, z = float(scale), float(zero_point)
        else:
            s = _broadcast(scale, x, axis).to(x.dtype)
            z = _broadcast(zero_point, x, axis).to(x.dtype)
        out = torch.clamp(x, (qmin - z) * s, (qmax - z) * s)
        ctx.save_for_backward(torch.sub(out, x).eq_(0))  # 1.0 inside the range, 0.0 outside
        return out.div_(s).round_().mul_(s)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, axis: Optional[int] = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient (see :class:`QuantGrad`)."""
    return QuantGrad.apply(x, scale, zero_point, qmin, qmax, axis)


class _Fp16RoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def simulate_float_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Deployment of wider types: 16 bits runs in fp16 (simulated by a round trip), else fp32."""
    if bits == FP16_BITS:
        return _Fp16RoundTrip.apply(x)
    return x


def weight_range(weight: torch.Tensor, scheme: str, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min/max of a weight, per channel along ``axis`` or over the whole tensor."""
    w = weight.detach()
    if is_per_channel(scheme):
        return torch.aminmax(w.transpose(0, axis).reshape(w.shape[axis], -1), dim=1)
    return torch.aminmax(w)


def fake_quant_tensor(x: torch.Tensor, bits: int, scheme: str, dtype: str, min_val: torch.Tensor,
                      max_val: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Simulate deployment of ``x``: integer grid for 1..8 bits, fp16 for 16, identity for 32."""
    if not is_integer_bits(bits):
        return simulate_float_bits(x, bits)
    scale, zero_point = qparams_from_range(min_val, max_val, bits, scheme, dtype)
    qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
    return fake_quantize(x, scale.to(x.device), zero_point.to(x.device), qmin, qmax,
                         axis if is_per_channel(scheme) else None)
