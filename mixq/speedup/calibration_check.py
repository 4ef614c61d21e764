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

from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..compressor.call_points import CallPoints, input_key, module_key
from ..compressor.calibration import TENSORS_KEY, CalibrationConfig, CalibrationError, layer_entries
from ..compressor.config import WEIGHT_TYPES
from ..compressor.fake_quant import is_integer_bits, is_per_channel
from ..compressor.layers import weight_axis

FIX = "export the calibration from this model (quantizer.export_model)"


class CalibrationMismatchError(CalibrationError, ValueError):
    """A calibration entry does not fit the module it names."""


def type_names(module: nn.Module) -> set:
    """The class names a module answers to (its class and base classes, not Module)."""
    return {cls.__name__ for cls in type(module).__mro__ if cls not in (nn.Module, object)}


def check_weight_geometry(name: str, entry: Mapping[str, Any], module: nn.Module) -> None:
    """A weight entry's layer has a weight; per-channel scales run along its output-channel axis,
    one per channel."""
    where = f"calibration entry {name!r}"
    if not isinstance(module, WEIGHT_TYPES) or not hasattr(module, "weight"):
        raise CalibrationMismatchError(f"{where} has weight_bits, but {name!r} is a {type(module).__name__}, which "
                                       f"has no weight to quantize: {FIX}")
    if not is_integer_bits(entry["weight_bits"]) or "weight_scale" not in entry:
        return
    if not is_per_channel(entry["weight_scheme"]):
        return
    axis, expected = entry.get("weight_axis"), weight_axis(module)
    if axis != expected:
        raise CalibrationMismatchError(f"{where}: weight_axis = {axis!r}, but the output channels of {name!r} "
                                       f"({type(module).__name__}) are weight axis {expected}: {FIX}")
    channels, scales = module.weight.shape[axis], len(entry["weight_scale"])
    if scales != channels:
        raise CalibrationMismatchError(f"{where}: {scales} weight_scale values for the {channels} output channels "
                                       f"of {name!r}: {FIX}")


def _zero_width(config: CalibrationConfig) -> Dict[str, str]:
    """``{point key: the entry and keys}`` of every zero-width integer range of ``config``."""
    found = {}
    for name, entry in layer_entries(config).items():
        for qtype, key in (("input", input_key(name, 0, 0)), ("output", module_key(name, 0))):
            bits = entry.get(f"{qtype}_bits")
            lo, hi = entry.get(f"tracked_min_{qtype}"), entry.get(f"tracked_max_{qtype}")
            if bits is not None and is_integer_bits(bits) and lo == hi == 0:
                found[key] = f"calibration entry {name!r}: tracked_min_{qtype} = tracked_max_{qtype} = 0"
    for key, t in (config.get(TENSORS_KEY) or {}).items():
        if t["tracked_min"] == t["tracked_max"] == 0:
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
    for name, entry in layer_entries(config).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CalibrationMismatchError(f"calibration entry {name!r} names no module of the model: {FIX}") from None
        recorded = entry.get("type")
        if recorded is not None and recorded not in type_names(module):
            raise CalibrationMismatchError(f"calibration entry {name!r}: 'type' is {recorded!r}, but {name!r} is a "
                                           f"{type(module).__name__} in this model: {FIX}")
        if "weight_bits" in entry:
            check_weight_geometry(name, entry, module)
    if run is not None:
        check_zero_width_ranges(model, config, run)
