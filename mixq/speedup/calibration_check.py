"""Does a calibration config belong to this model? Checked before anything is built from it.

:func:`~mixq.compressor.calibration.validate_calibration_config` checks a config on its own
(types, ranges, float32 scales). Here each layer entry is checked against the module it names:
the recorded ``type`` is the module's class (or a base class), weight keys sit on a layer that
has a weight, and per-channel weight scales run along the weight's output-channel axis, one
per channel. A config of another model would otherwise quantize the wrong tensors silently
(conv1's input range applied to a pool) or fail deep inside tensor code.

A zero-width integer range ([0, 0]) quantizes every value of its tensor to 0. A quantizer
records one for a tensor that was 0 on all calibration data (a dead ReLU), so it is accepted
where the model also computes 0 on a test batch, and refused where it does not.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from ..compressor.call_points import CallPoints, input_key, module_key
from ..compressor.calibration import CalibrationConfig, CalibrationError, layer_key
from ..compressor.calibration_record import CalibrationRecord, LayerCalibration
from ..compressor.config import MATMUL, WEIGHT_TYPES, is_matmul_site, matmul_scope
from ..compressor.layers import weight_axis

FIX = "export the calibration from this model (quantizer.export_model)"


class CalibrationMismatchError(CalibrationError, ValueError):
    """A calibration entry does not fit the module it names."""


def type_names(module: nn.Module) -> set:
    """The class names a module answers to (its class and base classes, not Module)."""
    return {cls.__name__ for cls in type(module).__mro__ if cls not in (nn.Module, object)}


def check_weight_geometry(name: str, layer: LayerCalibration, module: nn.Module) -> None:
    """A weight entry's layer has a weight; per-channel scales run along its output-channel axis,
    one per channel."""
    where = f"calibration entry {name!r}"
    if not isinstance(module, WEIGHT_TYPES) or not hasattr(module, "weight"):
        raise CalibrationMismatchError(f"{where} has weight_bits, but {name!r} is a {type(module).__name__}, which "
                                       f"has no weight to quantize: {FIX}")
    params = layer.weight
    if not params.integer or params.scale is None or not params.scheme.per_channel:
        return
    axis, expected = params.axis, weight_axis(module)
    if axis != expected:
        raise CalibrationMismatchError(f"{where}: weight_axis = {axis!r}, but the output channels of {name!r} "
                                       f"({type(module).__name__}) are weight axis {expected}: {FIX}")
    channels, scales = module.weight.shape[axis], len(params.scale)
    if scales != channels:
        raise CalibrationMismatchError(f"{where}: {scales} weight_scale values for the {channels} output channels "
                                       f"of {name!r}: {FIX}")


def _zero_width(config: CalibrationConfig) -> Dict[str, str]:
    """``{point key: the entry and keys}`` of every zero-width integer range of ``config``."""
    found = {}
    record = CalibrationRecord.from_dict(config)
    for name, layer in record.layers.items():
        for qtype, key in (("input", input_key(name, 0, 0)), ("output", module_key(name, 0))):
            params = layer.params(qtype)
            if params is not None and params.integer and params.tracked_min == params.tracked_max == 0:
                found[key] = (f"calibration entry {name!r}: {layer_key(qtype, 'tracked_min')} = "
                              f"{layer_key(qtype, 'tracked_max')} = 0")
    for key, params in (record.tensors or {}).items():
        if params.tracked_min == params.tracked_max == 0:
            found[key] = f"calibration tensor {key!r}: tracked_min = tracked_max = 0"
    return found


def check_zero_width_ranges(model: nn.Module, config: CalibrationConfig, run: Callable[[nn.Module], Any]) -> None:
    """Refuse a zero-width range on a tensor that ``run`` (one forward of ``model`` on a test
    batch) shows is not 0."""
    zero = _zero_width(config)
    if not zero:
        return
    nonzero = set()

    def look(key: str, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            nonzero.add(key)
        return x

    points = CallPoints(model, look, keys=set(zero))
    try:
        with torch.no_grad():
            run(model)
    finally:
        points.remove()
    for key in zero:
        if key in nonzero:
            raise CalibrationMismatchError(f"{zero[key]}, but this tensor is not 0 on a test batch: the range would "
                                           "quantize all of it to 0; calibrate again on data that reaches it")


def check_calibration(model: nn.Module, config: CalibrationConfig,
                      run: Optional[Callable[[nn.Module], Any]] = None) -> None:
    """Raise :class:`CalibrationMismatchError` naming the layer and the key where a (validated)
    calibration ``config`` does not fit ``model``; ``run`` (one forward of ``model`` on a test
    batch) also checks zero-width ranges."""
    for name, layer in CalibrationRecord.from_dict(config).layers.items():
        if is_matmul_site(name):  # the matrix products inside a module (its operands are placed points)
            name = matmul_scope(name)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CalibrationMismatchError(f"calibration entry {name!r} names no module of the model: {FIX}") from None
        if layer.type is not None and layer.type != MATMUL and layer.type not in type_names(module):
            raise CalibrationMismatchError(f"calibration entry {name!r}: 'type' is {layer.type!r}, but {name!r} is a "
                                           f"{type(module).__name__} in this model: {FIX}")
        if layer.weight is not None:
            check_weight_geometry(name, layer, module)
    if run is not None:
        check_zero_width_ranges(model, config, run)
