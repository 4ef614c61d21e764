"""A BatchNorm run as an integer kernel: ``y = factor * x + shift`` per channel on a quantized ``x``.

A BatchNorm that no conv before it absorbs (DenseNet's and pre-activation ResNets' BN -> ReLU ->
conv, on a concatenation or a residual sum) runs on ONNX Runtime as a depthwise 1x1 QLinearConv
(:mod:`mixq.speedup.backends.ort_channel_affine`): per-channel int8 weights that hold ``factor``
exactly (code +-127, scale ``|factor| / 127``) and an int32 bias on the grid
``input_scale * weight_scale``. That bias is the one rounding the float BatchNorm does not have;
the quantizers add it (:meth:`engine_shift` minus ``shift``) so the simulation computes what the
engine does. Both sides compute here, in float32 as the BatchNorm's own buffers are.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

WEIGHT_CODE = 127
_INT32_BIAS_LIMIT = 2.0 ** 30  # keep bias codes well inside int32
_TINY = np.float32(1e-30)


def factor_and_shift(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                     eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """An eval-mode BatchNorm as ``factor * x + shift``, float32 like torch's own arithmetic."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float32) for a in (gamma, beta, mean, var))
    factor = gamma / np.sqrt(var + np.float32(eps))
    return factor, beta - mean * factor


def affine_codes(factor: np.ndarray, shift: np.ndarray, input_scale: float
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(weight codes int8, weight scales, bias codes int32, bias scales)`` of the depthwise 1x1
    conv computing ``factor * x + shift`` on an input of scale ``input_scale``.

    The weight scale is ``|factor| / 127`` (so the code is +-127 and holds ``factor``), widened
    only where a near-zero factor would push the bias code past 2**30."""
    factor = np.asarray(factor, dtype=np.float32)
    shift = np.asarray(shift, dtype=np.float32)
    s_x = np.float32(input_scale)
    w_scale = np.maximum(np.abs(factor) / np.float32(WEIGHT_CODE),
                         np.maximum(np.abs(shift) / (s_x * np.float32(_INT32_BIAS_LIMIT)), _TINY)).astype(np.float32)
    w_codes = np.clip(np.round(factor / w_scale), -WEIGHT_CODE, WEIGHT_CODE).astype(np.int8)
    b_scale = (s_x * w_scale).astype(np.float32)
    b_codes = np.round(shift.astype(np.float64) / b_scale.astype(np.float64)).astype(np.int32)
    return w_codes, w_scale, b_codes, b_scale


def engine_shift(factor: np.ndarray, shift: np.ndarray, input_scale: float) -> np.ndarray:
    """The per-channel shift the integer kernel adds (``shift`` rounded to its int32 grid)."""
    _, _, b_codes, b_scale = affine_codes(factor, shift, input_scale)
    return (b_codes.astype(np.float32) * b_scale).astype(np.float32)


def shift_rounding(bn: nn.Module, input_scale: float) -> torch.Tensor:
    """What the engine's int32 bias adds to eval-mode ``bn``'s output on an input of scale
    ``input_scale``, per channel (shape ``(1, C, 1, 1)``): ``engine_shift - shift``."""
    running_var = bn.running_var.detach().cpu().numpy()
    gamma = bn.weight.detach().cpu().numpy() if bn.weight is not None else np.ones_like(running_var)
    beta = bn.bias.detach().cpu().numpy() if bn.bias is not None else np.zeros_like(running_var)
    factor, shift = factor_and_shift(gamma, beta, bn.running_mean.detach().cpu().numpy(), running_var, bn.eps)
    delta = engine_shift(factor, shift, input_scale) - shift
    return torch.from_numpy(delta).reshape(1, -1, 1, 1)


__all__ = ["factor_and_shift", "affine_codes", "engine_shift", "shift_rounding", "WEIGHT_CODE"]
