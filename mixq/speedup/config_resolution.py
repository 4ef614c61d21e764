"""What ``ModelSpeedup`` builds from: a calibration config completed for one model and backend.

Entries that give only bit widths are calibrated, and with ``extra_layer_bits=8`` the Conv/Linear
layers the config leaves out too, in one joint placement (an ``ObserverQuantizer`` under the
backend's placement) over calibration batches; what the config measured is kept. A placed
calibration's tensors are then located in the engine's own export.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import onnx
import torch
import torch.nn as nn

from ..compressor.calibration import (PLACEMENT_KEY, TENSORS_KEY, CalibrationConfig, layer_entries, layer_key,
                                     validate_calibration_config)
from ..compressor.calibration_record import CalibrationRecord
from ..compressor.config import QUANT_TYPES, WEIGHT_TYPES, is_matmul_site, matmul_scope
from ..compressor.fake_quant import is_integer_bits
from ..compressor.model_io import ModelInputs
from ..messages import close_matches, short_repr
from ..placement.locate import locate_points
from .grid import Grid, grid_of

logger = logging.getLogger(__name__)


# The user's entries are read before they are complete (bit widths without ranges are what is
# calibrated here), so before they can be validated into records: by their keys.
def _has_ranges(entry: Dict[str, Any]) -> bool:
    for qtype in QUANT_TYPES:
        bits = entry.get(layer_key(qtype, "bits"))
        if bits is None or not is_integer_bits(bits):
            continue
        needed = ("scale",) if qtype == "weight" else ("tracked_min", "tracked_max")
        if any(layer_key(qtype, f) not in entry for f in needed):
            return False
    return True


def _config_list_entry(name: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    types = [t for t in QUANT_TYPES if layer_key(t, "bits") in entry]
    item: Dict[str, Any] = {"op_names": [name], "quant_types": types,
                            "quant_bits": {t: entry[layer_key(t, "bits")] for t in types}}
    for field_ in ("scheme", "dtype"):
        values = {t: entry[layer_key(t, field_)] for t in types if layer_key(t, field_) in entry}
        if values:
            item[f"quant_{field_}"] = values
    return item


def _as_inputs(batch: Any) -> ModelInputs:
    """Model inputs of one calibration batch: a tensor, a tuple of tensors, a dict of keyword
    tensors, or the first item of (inputs, labels)."""
    for candidate in (batch, batch[0] if isinstance(batch, (tuple, list)) and batch else None):
        if candidate is None:
            continue
        try:
            return ModelInputs.of(candidate)
        except TypeError:
            continue
    raise TypeError("calib_data_loader must yield tensors, tuples or dicts of tensors, or (inputs, labels) pairs; "
                    f"got {type(batch).__name__}")


@dataclass
class ConfigResolver:
    """How to complete a config: the backend, the bits of unconfigured layers, the data."""

    backend: str
    extra_layer_bits: int = 32
    dynamic: bool = False
    calib_data_loader: Optional[Iterable[Any]] = None
    calib_batches: Optional[int] = None
    # filled by resolve(): extra layers that stay float, and why
    float_layers: Dict[str, str] = field(default_factory=dict)

    def _extra_layers(self, model: nn.Module, config: CalibrationConfig) -> List[str]:
        return [n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES) and n not in config]

    def _auto_config_list(self, model: nn.Module, layers: List[str]) -> List[Dict[str, Any]]:
        """Config list making ``layers`` int8: the backend's placement quantizes what they need;
        with ``dynamic``, Linear layers quantize their activations at run time instead."""
        dynamic = [n for n in layers if self.dynamic and isinstance(model.get_submodule(n), nn.Linear)]
        static = [n for n in layers if n not in dynamic]
        if self.dynamic and self.calib_data_loader is None and static:
            note = ("run-time (dynamic) quantization covers Linear layers; without calibration data this layer "
                    "stays fp32 (pass calib_data_loader= to run it in int8)")
            self.float_layers.update({n: note for n in static})
            logger.warning("dynamic=True without calibration data: %d layer(s) stay fp32 (%s); pass "
                           "calib_data_loader= to quantize them statically", len(static), ", ".join(static[:5])
                           + (", ..." if len(static) > 5 else ""))
            static = []
        items = [{"op_names": static, "quant_types": ["weight"], "quant_bits": 8}] if static else []
        if dynamic:
            items.append({"op_names": dynamic, "quant_types": ["weight"], "quant_bits": 8, "quant_dynamic": True})
        return items

    def _calibrate(self, model: nn.Module, config_list: List[Dict[str, Any]]) -> CalibrationConfig:
        from ..quantizers import ObserverQuantizer

        clone = copy.deepcopy(model)
        quantizer = ObserverQuantizer(clone, config_list, backend=self.backend, distributed=False)  # a local build
        if quantizer.backend is None:  # only run-time (dynamic) activation quantization: weights need no data
            quantizer.compress()
            return quantizer.calibration_config()
        if self.calib_data_loader is None:
            raise ValueError("activation ranges are missing (config entries without tracked ranges, or "
                             "extra_layer_bits=8): pass calib_data_loader= with a few batches of real inputs, "
                             "or dynamic=True to quantize Linear activations at run time")
        seen = 0
        with torch.no_grad():
            for i, batch in enumerate(self.calib_data_loader):
                if self.calib_batches is not None and i >= self.calib_batches:
                    break
                _as_inputs(batch).map(lambda t: t.float().cpu() if t.is_floating_point() else t.cpu()).call(clone)
                seen += 1
        if not seen:
            raise ValueError("calib_data_loader yielded no batch; give it real input batches")
        quantizer.compress()
        logger.info("calibrated %d config entries on %d batches for %s", len(config_list), seen, self.backend)
        return quantizer.calibration_config()

    def resolve(self, model: nn.Module, config: Optional[CalibrationConfig]) -> Tuple[CalibrationConfig, List[str]]:
        """The complete calibration, and the Conv/Linear layers left at ``extra_layer_bits`` (16 or 32)."""
        config = dict(config or {})
        names = {n for n, _ in model.named_modules()}
        for name in layer_entries(config):
            if name not in names and not (is_matmul_site(name) and matmul_scope(name) in names):
                raise ValueError(f"the config names layer {short_repr(name)}, which is not a module of the model"
                                 f"{close_matches(name, names)}: export the calibration from this model")
        placed = config.get(PLACEMENT_KEY)
        if placed is not None and placed["backend"] != self.backend:
            raise ValueError(f"the calibration places quantization for {placed['backend']!r}, this engine is "
                             f"{self.backend!r}: calibrate again with the quantizer's "
                             f"backend={self.backend!r} (or build with backend={placed['backend']!r})")
        layers = layer_entries(config)
        needs = {name: entry for name, entry in layers.items() if not _has_ranges(entry)}
        extra = self._extra_layers(model, layers)
        if not needs and not (self.extra_layer_bits == 8 and extra):
            return validate_calibration_config(config), ([] if self.extra_layer_bits == 8 else extra)
        # calibrate with one joint placement over every integer layer; keep what the config measured
        config_list = [_config_list_entry(n, e) for n, e in layers.items()]
        if self.extra_layer_bits == 8:
            config_list += self._auto_config_list(model, extra)
        calibrated = self._calibrate(model, config_list)
        resolved = {n: e for n, e in layers.items() if n not in needs}
        resolved.update({n: e for n, e in layer_entries(calibrated).items() if n not in resolved})
        if PLACEMENT_KEY in calibrated:  # else only run-time (dynamic) quantization: nothing placed
            tensors = dict(calibrated[TENSORS_KEY])
            tensors.update({k: v for k, v in config.get(TENSORS_KEY, {}).items() if k in tensors})
            resolved[TENSORS_KEY], resolved[PLACEMENT_KEY] = tensors, calibrated[PLACEMENT_KEY]
        return validate_calibration_config(resolved), ([] if self.extra_layer_bits == 8 else extra)


def locate_grids(model: nn.Module, fp32_model: onnx.ModelProto, calls: Any, config: CalibrationConfig,
                 example: ModelInputs, export: Callable[[nn.Module], onnx.ModelProto]
                 ) -> Tuple[Optional[Dict[str, Grid]], Optional[Dict[Tuple[str, str], Grid]]]:
    """Grids of a placed calibration's tensors, located in ``fp32_model`` (the engine's export of
    ``model``): by tensor, and by (tensor, reader) for a layer's own input; None without placement."""
    record = CalibrationRecord.from_dict(config)
    if record.tensors is None:
        return None, None
    tensors = record.tensors
    located = locate_points(fp32_model, calls, model, example, tensors, export, record.tensor_names)
    for key in located.missing:
        logger.warning("calibration tensor %s has no counterpart in this model's graph; it is not quantized "
                       "(calibrate this model again)", key)
    points = {t: grid_of(tensors[k]) for k, t in located.tensors.items()}
    edges = {edge: grid_of(tensors[k]) for k, es in located.edges.items() for edge in es}
    return points, edges
