"""Integer weights as the exported graph holds them: codes, scales and zero points of a layer's
weight, checked against the model, through BatchNorm folding and the ONNX layout."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..compressor.calibration import CalibrationConfig
from ..compressor.calibration_record import LayerCalibration
from ..compressor.fake_quant import quant_range, quantize
from ..compressor.layers import bn_factor, weight_axis
from ..placement.onnx_export import FoldedBatchNorm

logger = logging.getLogger(__name__)


@dataclass
class WeightQuant:
    """Integer weights of one node, laid out as its ONNX initializer, stored in int8."""

    codes: np.ndarray            # int8, shape of the ONNX weight
    scales: np.ndarray           # float32, one per channel (or one)
    zero_points: np.ndarray      # int8, same length as scales
    axis: Optional[int]          # channel axis in the ONNX layout, None for one scale
    bits: int


class FoldError(ValueError):
    """A BatchNorm cannot be folded into its conv without changing the integer weights."""



def channel_shape(weight: torch.Tensor, axis: int) -> List[int]:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return shape


def weight_codes(weight: torch.Tensor, calibration: Union[LayerCalibration, Mapping[str, Any]], layer: str,
                 bn: Optional[FoldedBatchNorm], fold_at_export: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[int]]:
    """Integer codes (int8 range), scales, zero points and channel axis of a layer's weight as
    the exported graph holds it (folded or not), from the raw module ``weight`` and its
    calibration (integer weight params; a layer entry of a calibration dict is read as one).

    ``calibration.folded_bn`` says which weight the scales refer to (the BN-folded one or the raw
    one); ``fold_at_export`` says which one the graph holds. Per-channel rescaling by the BN
    factor converts one into the other without touching the integers (a negative factor flips
    their sign). Raises :class:`FoldError` where that is impossible.
    """
    if not isinstance(calibration, LayerCalibration):
        calibration = LayerCalibration.from_dict(calibration)
    params = calibration.weight
    bits, scheme, dtype = params.bits, params.scheme, params.dtype
    qmin, qmax = quant_range(bits, dtype, scheme.symmetric)
    scales = torch.tensor(params.scale, dtype=torch.float32)
    zps = torch.tensor(params.zero_point, dtype=torch.int64)
    axis = params.axis if scheme.per_channel else None
    weight = weight.detach().float()
    if scheme.per_channel and (axis is None or not 0 <= axis < weight.dim()
                                   or scales.numel() != weight.shape[axis]):
        raise ValueError(f"calibration entry {layer!r}: {scales.numel()} weight_scale values along weight_axis "
                         f"{axis!r} do not fit its weight of shape {tuple(weight.shape)}: export the calibration "
                         "from this model")
    ref = weight
    config_folded = calibration.folded_bn is not None
    if config_folded:
        if bn is None or calibration.folded_bn not in (bn.bn, f"{bn.bn}.module"):  # or the inner module of a wrapped BN
            raise FoldError(f"layer {layer!r}: the calibration folded BatchNorm {calibration.folded_bn!r}, which does "
                            "not directly follow it in this model")
        ref = weight * bn.factor.reshape(channel_shape(weight, bn.axis))
    codes = quantize(ref, scales, zps, qmin, qmax, axis)
    _check_codes(ref, codes, scales, zps, qmin, qmax, axis, layer, scheme.symmetric)
    if config_folded != fold_at_export:
        f = bn.factor.float()
        if axis is None:  # one scale becomes one per channel: s * |f_c|
            scales, zps, axis = scales.expand(f.numel()).clone(), zps.expand(f.numel()).clone(), bn.axis
        if axis != bn.axis:
            raise FoldError(f"layer {layer!r}: weight scales are per axis {axis}, BatchNorm folds along axis {bn.axis}")
        if bool((f == 0).any()):
            raise FoldError(f"layer {layer!r}: BatchNorm {bn.bn!r} has a zero scale factor")
        sign = torch.sign(f)
        codes = codes * sign.reshape(channel_shape(codes, axis))
        zps = zps * sign.to(torch.int64)
        scales = scales * f.abs() if fold_at_export else scales / f.abs()
    if dtype == "uint":  # same real values on the int8 storage grid
        codes, zps = codes - 128, zps - 128
    if bool((codes < -128).any() or (codes > 127).any()):
        raise FoldError(f"layer {layer!r}: folding BatchNorm {bn.bn if bn else ''!r} flips a weight code of -128 "
                        "out of the int8 range")
    return codes, scales, zps, axis


# the scale an all-zero channel gets (a pruned filter, a zero-initialised head): any grid fits it
_SMALLEST_SCALE = 1.0001 * torch.finfo(torch.float32).eps


def _check_codes(ref: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, qmin: int,
                 qmax: int, axis: Optional[int], layer: str, symmetric: bool) -> None:
    """The scales must belong to this weight: every observer picks a grid inside the weight's
    own range (widened to 0, within a step) that leaves most of each channel's values inside it."""
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError(f"calibration entry {layer!r}: weight_scale holds values that are not positive finite "
                         "float32 numbers: export the calibration again")
    rows = ref.transpose(0, axis).reshape(ref.shape[axis], -1) if axis is not None else ref.reshape(1, -1)
    lo = torch.clamp(rows.min(dim=1).values, max=0.0)
    hi = torch.clamp(rows.max(dim=1).values, min=0.0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    grid_lo, grid_hi = (qmin - zps) * scales, (qmax - zps) * scales
    too_wide = ((grid_hi > hi + 1.01 * scales) | (grid_lo < lo - 1.01 * scales)) & (scales > _SMALLEST_SCALE)
    # values more than half a step outside the grid, per channel (a clipping observer clips a few)
    steps = rows / scales.reshape(-1, 1) + zps.reshape(-1, 1)
    outside = ((steps < qmin - 0.501) | (steps > qmax + 0.501)).float().mean(dim=1)
    if bool(too_wide.any()) or bool((outside > 0.5).any()):
        channel = int(torch.nonzero(too_wide | (outside > 0.5))[0])
        why = ("its scale is wider than the weights" if bool(too_wide[channel])
               else f"{float(outside[channel]):.0%} of its weights fall outside the grid")
        raise ValueError(f"the calibration config of layer {layer!r} does not match the model's weights (channel "
                         f"{channel}: {why}): pass the model the calibration was exported from")


def onnx_weight_quant(codes: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, axis: Optional[int],
                      onnx_weight: np.ndarray, reference: torch.Tensor, bits: int) -> Optional[WeightQuant]:
    """Lay codes out like the ONNX initializer ``onnx_weight``: the same layout as ``reference``
    (the float weight the codes quantize, in torch's layout), or its transpose (a Linear exported
    as MatMul holds W^T; for a square weight only the values tell which)."""
    shape = list(onnx_weight.shape)
    ref = reference.detach().float().numpy()
    transposed = codes.dim() == 2 and list(codes.shape[::-1]) == shape and (
        list(codes.shape) != shape or np.abs(onnx_weight - ref.T).max() < np.abs(onnx_weight - ref).max())
    if transposed:
        codes = codes.t()
        axis = None if axis is None else 1 - axis
    elif list(codes.shape) != shape:
        return None
    return WeightQuant(codes.to(torch.int8).numpy(), scales.numpy().astype(np.float32),
                       zps.to(torch.int8).numpy(), axis, bits)


def choose_folds(model: nn.Module, pairs: Mapping[str, str], config: CalibrationConfig,
                 placed: bool = False) -> Dict[str, str]:
    """The Conv -> BN pairs that can be folded consistently with the calibration: not when the
    conv's output or the BN's input is quantized (that sits between the two; a placed
    calibration quantizes after the BN, as the backend folds it), nor when the integer weights
    would not survive folding."""
    folds = {}
    for conv_name, bn_name in pairs.items():
        conv_entry = LayerCalibration.from_dict(config.get(conv_name, {}))
        bn_entry = LayerCalibration.from_dict(config.get(bn_name, {}))
        if not placed and (conv_entry.output is not None or bn_entry.input is not None):
            logger.info("not folding %s into %s: a quantizer sits between them", bn_name, conv_name)
            continue
        if conv_entry.weight is not None and conv_entry.weight.integer:
            conv = model.get_submodule(conv_name)
            bn = FoldedBatchNorm(conv_name, bn_name, bn_factor(model.get_submodule(bn_name)).detach(), weight_axis(conv))
            try:
                weight_codes(conv.weight, conv_entry, conv_name, bn, fold_at_export=True)
            except FoldError as exc:
                logger.warning("not folding %s into %s: %s", bn_name, conv_name, exc)
                continue
        folds[conv_name] = bn_name
    return folds
