"""Backend placement for quantizers: simulate activations exactly where the backend puts Q/DQ.

A quantizer built with ``backend='onnxruntime'`` (the default) or ``'tensorrt'`` asks the
backend's placement policy (:mod:`mixq.placement`) which tensors to quantize, on the first
forward (or on ``dummy_input`` right away), and then observes and fake-quantizes exactly
those tensors: residual Adds, Concats, SiLU's sigmoid, the output after a fused ReLU...,
wherever the model computes them (functional calls, in-place ops, a module called several
times). Layer wrappers keep only the weights. ``backend=None`` keeps the config's literal
module-boundary quantization (what the reconstruction quantizer uses).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import torch

from ..compressor.calibration_record import CalibrationRecord, LayerCalibration, QuantParams
from ..compressor.config import is_matmul_site
from ..compressor.fake_quant import is_integer_bits
from ..compressor.model_io import ModelInputs
from ..compressor.observers import NonFiniteTensorError
from ..compressor.quantizer import Quantizer
from ..compressor.wrapped import is_wrapper
from ..compressor.wrapper import unwrapped_copy
from ..placement.model_placement import LayerIntent, PointPlan, plan_points
from ..placement.op_rules import auto_backend
from ..placement.policy import PointSpec

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt", "openvino")
DEFAULT_BACKEND = "onnxruntime"


def resolve_placement_backend(backend: Optional[str]) -> Optional[str]:
    """``'auto'`` -> the backend ModelSpeedup would pick; None stays None (literal config)."""
    if backend is None:
        return None
    if backend == "auto":
        return auto_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, 'auto' or None, got {backend!r}")
    return backend


def _as_inputs(args: Any, kwargs: Optional[Dict[str, Any]] = None) -> ModelInputs:
    """The tensors of one model call; other arguments are not supported by placement."""
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if not all(torch.is_tensor(t) for t in args) or not all(torch.is_tensor(v) for v in kwargs.values()) \
            or not (args or kwargs):
        raise TypeError("placement needs the model's inputs as tensors (positional or keyword): pass dummy_input= "
                        "a batch (a tensor, a tuple or a dict of tensors)")
    return ModelInputs(args, kwargs)


def _layer_of(why: str, plan: PointPlan) -> Optional[str]:
    """The configured layer whose node a policy point's description names, if any."""
    node = why.rpartition(" ")[2]
    return plan.node_layers.get(node)


class PlacementMixin:
    """Mixed into a :class:`~mixq.compressor.quantizer.Quantizer` subclass; call
    :meth:`_init_placement` at the end of its ``__init__``."""

    point_plan: Optional[PointPlan] = None
    backend: Optional[str] = None

    def _init_placement(self: Quantizer, backend: Optional[str], dummy_input: Any) -> None:
        self.backend = resolve_placement_backend(backend)
        self.point_plan = None
        self._lazy_handle = None
        if all(cfg.dynamic for cfg in self.layer_configs.values()):
            self.backend = None  # activations are quantized at run time: nothing to place
        if self.backend is None:
            return
        for wrapper in self.modules_wrapper.values():
            wrapper.simulated_types = [t for t in wrapper.config.quant_types if t == "weight"]
        if dummy_input is not None:
            self._place(ModelInputs.of(dummy_input, self.bound_model))
            return

        def first_forward(module, args, kwargs):
            self._lazy_handle.remove()
            self._lazy_handle = None
            self._place(_as_inputs(args, kwargs))
            return self._call_points._root_pre(module, args, kwargs)
        first_forward._mixq_hook = True

        self._lazy_handle = self.bound_model.register_forward_pre_hook(first_forward, with_kwargs=True)

    def _intents(self: Quantizer) -> Dict[str, LayerIntent]:
        intents = {}
        for name, cfg in self.layer_configs.items():
            acts = {}
            for qtype in ("input", "output"):
                if qtype in cfg.quant_types:
                    acts[qtype] = PointSpec(
                        bits=cfg.bits[qtype],
                        scheme=cfg.scheme[qtype] if ("scheme", qtype) in cfg.explicit else None,
                        dtype=cfg.dtype[qtype] if ("dtype", qtype) in cfg.explicit else None)
            intents[name] = LayerIntent(name, cfg.bits.get("weight"), acts, dynamic=cfg.dynamic)
        return intents

    def _point_context(self, key: str) -> str:
        spec = self.point_plan.points.get(key) if self.point_plan is not None else None
        if spec is None:
            return ""
        layer = spec.layer or _layer_of(spec.why, self.point_plan)
        return f" ({spec.why}" + (f", layer {layer!r})" if layer else ")")

    def _place(self: Quantizer, inputs: ModelInputs) -> None:
        for name, t in zip(inputs.names(), inputs.tensors()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                where = f"input {name[6:] or 0}" if name.startswith("input") else f"input {name!r}"
                raise NonFiniteTensorError(f"{where} of the model contains NaN or infinity; clean the data "
                                           "(e.g. torch.nan_to_num) before running it through the quantizer")
        model = unwrapped_copy(self.bound_model).cpu().float().eval()
        example = inputs.map(lambda t: t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu())
        self.point_plan = plan_points(model, example, self._intents(), self.backend, self.excluded)
        grids = {key: self.point_plan.grid(key) for key in self.point_plan.points}
        affine = {}
        for key, (source, name) in self.point_plan.channel_affines.items():
            bn = self.bound_model.get_submodule(name)
            affine[key] = (source, bn.module if is_wrapper(bn) else bn)
        self.install_points(grids, {key: spec.fixed for key, spec in self.point_plan.points.items() if spec.fixed},
                            affine)
        self._simulate_integer_biases(self.point_plan)
        self._on_points_placed()

    def _simulate_integer_biases(self: Quantizer, plan: PointPlan) -> None:
        """Tell each wrapper where the engine rounds its bias to int32 (and which BatchNorm the
        export folds into it first)."""
        for name, wrapper in self.modules_wrapper.items():
            point = plan.bias_inputs.get(name)
            bn_name = plan.folded_bn.get(name)
            bn = self.bound_model.get_submodule(bn_name) if point is not None and bn_name else None
            wrapper.set_integer_bias(point, bn.module if is_wrapper(bn) else bn)

    def _on_points_placed(self) -> None:
        """Subclasses create per-point state here (observers...)."""

    def _require_placement(self: Quantizer) -> PointPlan:
        if self.point_plan is None:
            raise RuntimeError("no forward pass has run through the model yet, so the backend placement is unknown: "
                               "run calibration/training forwards (or pass dummy_input=) before exporting")
        return self.point_plan

    def _point_params(self: Quantizer, key: str) -> Optional[QuantParams]:
        """The grid and tracked range of point ``key``; None while an integer range is unobserved."""
        bits, scheme, dtype = self.point_grids[key]
        lo, hi = self.point_ranges[key]
        if is_integer_bits(bits) and (math.isnan(float(lo)) or math.isnan(float(hi))):
            return None
        return QuantParams(bits, scheme, dtype, float(lo), float(hi))

    def _complete_calibration(self: Quantizer, record: CalibrationRecord) -> CalibrationRecord:
        """``record`` (the layers) completed with the placed tensors' ranges; each layer's activation
        params are those of the tensors that serve it (a layer none serves drops that type)."""
        if self.backend is None:
            return record
        plan = self._require_placement()
        tensors = {}
        for key in plan.points:
            params = self._point_params(key)
            if params is None:
                raise RuntimeError(f"tensor {key!r} ({plan.points[key].why}) saw no data: run calibration forwards "
                                   "(training for QAT) through the model before exporting")
            tensors[key] = params
        tensors.update({key: tensors[source] for key, source in plan.shared.items()})
        layers = {name: layer.replace(**{q: tensors.get(plan.serves.get(name, {}).get(q)) for q in ("input", "output")})
                  for name, layer in record.layers.items()}
        for name, cfg in self.layer_configs.items():
            key = plan.serves.get(name, {}).get("input")
            if is_matmul_site(name) and key in tensors:
                layers[name] = LayerCalibration(cfg.module_type, input=tensors[key])
        kept = {n: layer for n, layer in layers.items() if layer.quant_types}
        for name in set(layers) - set(kept):
            logger.warning("layer %s: %s", name, plan.notes.get(name, "none of its quantization could be placed"))
        # a hint for the engine: the graph tensor each point is (same exporter, same model)
        names = {key: plan.point_tensors[key] for key in tensors if plan.point_tensors.get(key) is not None}
        return CalibrationRecord(kept, tensors, names, self.backend)
