"""The Quantizer base class: validate a config list, wrap layers in place, export calibration."""
from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .bn_fold import find_conv_bn_pairs
from .call_points import CallPoints, PointKey
from .calibration import CalibrationConfig, validate_calibration_config
from .calibration_record import CalibrationRecord, LayerCalibration, QuantParams
from .export_files import write_export
from .layers import weight_axis
from .integer_affine import shift_rounding
from .scheme import Scheme
from .point_state import BUFFERS_PER_POINT, PREFIX as POINT_PREFIX, PointState
from .config import ConfigError, ConfigListSpec, LayerQuantConfig, module_names, is_matmul_site
from .distributed import (broadcast_outcome, check_same_on_all_ranks, digest, hide_from_ddp, rank, unwrap_parallel,
                          use_distributed)
from .observers import NonFiniteTensorError
from .fake_quant import fake_quant_tensor, is_integer_bits, qparams_from_range, weight_range
from .model_io import check_dummy_input, model_device
from .wrapper import QuantizerModuleWrapper, set_submodule, unwrapped_copy

logger = logging.getLogger(__name__)


class Quantizer:
    """Base class of all quantizers (NNI 2.x style).

    Subclasses define :meth:`config_spec` and the three ``quantize_*`` hooks that wrappers call.
    The model is wrapped in place at construction; :meth:`compress` returns the same model.

    Distributed (``torch.distributed``, :mod:`.distributed`): a ``DistributedDataParallel`` model
    is quantized through its inner module; with ``distributed`` true (default: when a process
    group of several ranks is initialised) every rank must resolve the same layer configs
    (checked at construction), and :meth:`export_model` writes files on rank 0 only.
    """

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]],
                 optimizer: Optional[torch.optim.Optimizer] = None, dummy_input: Any = None,
                 distributed: Optional[bool] = None) -> None:
        model = unwrap_parallel(model)
        self.distributed = use_distributed(distributed)
        if any(isinstance(m, QuantizerModuleWrapper) for m in model.modules()):
            raise ConfigError("the model is already wrapped by a quantizer; pass the original float model "
                              "(mixq.compressor.unwrapped_copy(model) gives one)")
        self.bound_model = model
        self.config_list = config_list
        self.optimizer = optimizer
        self.dummy_input = dummy_input
        spec = self.config_spec()
        self.layer_configs: Dict[str, LayerQuantConfig] = spec.resolve(model, config_list)
        self.excluded = sorted(spec.excluded)
        if self.distributed:
            check_same_on_all_ranks(
                digest([type(self).__name__, {n: vars(c) for n, c in self.layer_configs.items()}]),
                "resolved layer configs", "build the quantizer with the same model and config list on every rank")
        if dummy_input is not None:
            check_dummy_input(model, dummy_input)
        # activation points (placement-aware quantizers): key -> (bits, scheme, dtype) and range
        self.point_grids: Dict[PointKey, Tuple[int, str, str]] = {}
        self.point_fixed: Dict[PointKey, Tuple[float, float]] = {}
        self.point_affine: Dict[PointKey, Tuple[PointKey, nn.Module]] = {}
        self.point_ranges = PointState(model, ())
        self._call_points: Optional[CallPoints] = None
        self._pending_point_state: Dict[str, torch.Tensor] = {}
        ref = weakref.ref(self)

        def stash(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *_: Any) -> None:
            quantizer = ref()
            if quantizer is not None and module is quantizer.bound_model:  # not a copy of the model
                quantizer._stash_point_state(state_dict, prefix)
        model.register_load_state_dict_pre_hook(stash)

        def reload_switches(module: nn.Module, _keys: Any) -> None:
            quantizer = ref()
            if quantizer is not None and module is quantizer.bound_model:
                quantizer.point_ranges.reload_switches()
        model.register_load_state_dict_post_hook(reload_switches)
        self.modules_wrapper: Dict[str, QuantizerModuleWrapper] = {}
        for name, cfg in self.layer_configs.items():
            if is_matmul_site(name):  # no module to wrap: the placement quantizes its operands
                continue
            names = module_names(model, name)
            wrapper = QuantizerModuleWrapper(model.get_submodule(name), name, cfg, self)
            for other in names:  # every call site of a module registered twice (self.alias = self.conv)
                set_submodule(model, other, wrapper)
            self.modules_wrapper[name] = wrapper
        self._hide_state_from_ddp()

    def _hide_state_from_ddp(self) -> None:
        """The quantizer's buffers (kept identical on every rank by the quantizer itself) are not
        DistributedDataParallel's to broadcast."""
        names = [f"{alias}.{key}" for name, wrapper in self.modules_wrapper.items()
                 for alias in module_names(self.bound_model, name) for key, _ in wrapper.named_buffers()
                 if not key.startswith("module.")]
        names += [key for key in self.bound_model._buffers if key.startswith(POINT_PREFIX)]
        hide_from_ddp(self.bound_model, names)

    def _stash_point_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Tensor ranges in a checkpoint loaded before this quantizer placed its tensors (placement
        happens on the first forward without ``dummy_input``): kept and loaded once they exist."""
        if self._call_points is None:
            for key in [k for k in state_dict if k.startswith(prefix + POINT_PREFIX)]:
                self._pending_point_state[key[len(prefix):]] = state_dict.pop(key)

    def _load_pending_point_state(self) -> None:
        pending, self._pending_point_state = self._pending_point_state, {}
        names = {n for n in self.bound_model._buffers if n.startswith(POINT_PREFIX)}
        if set(pending) != names:
            raise ConfigError(f"the checkpoint loaded into this model holds the state of "
                              f"{len(pending) // BUFFERS_PER_POINT} tensors, the placement of this model and config "
                              f"list has {len(names) // BUFFERS_PER_POINT}; load a checkpoint of the same model, config "
                              "list and backend")
        with torch.no_grad():
            for name, value in pending.items():
                getattr(self.bound_model, name).copy_(value)
        self.point_ranges.reload_switches()

    def _restore_model(self) -> None:
        """Undo the wrapping (and activation hooks): for a constructor that fails after wrapping."""
        if self._call_points is not None:
            self._call_points.remove()
            self._call_points = None
        for name, wrapper in self.modules_wrapper.items():
            for other in module_names(self.bound_model, name):
                set_submodule(self.bound_model, other, wrapper.module)
        self.modules_wrapper = {}

    @classmethod
    def config_spec(cls) -> ConfigListSpec:
        """What this quantizer accepts in a config list."""
        return ConfigListSpec(quantizer=cls.__name__)

    def compress(self) -> nn.Module:
        """Finish setting up quantization and return the (wrapped, same) model."""
        return self.bound_model

    # Switches (every wrapped layer and activation point) ---------------------------------------
    def enable_observer(self, enabled: bool = True) -> None:
        """Let every wrapped layer and activation point update its ranges (``False``: freeze them)."""
        self._set_switches(observer=enabled)

    def disable_observer(self) -> None:
        """Freeze every range."""
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Run every wrapped layer and activation point quantized (``False``: in float)."""
        self._set_switches(fake_quant=enabled)

    def disable_fake_quant(self) -> None:
        """Run the model in float (ranges are still observed while the observers are on)."""
        self.enable_fake_quant(False)

    def _set_switches(self, observer: Optional[bool] = None, fake_quant: Optional[bool] = None) -> None:
        for wrapper in self.modules_wrapper.values():
            if observer is not None:
                wrapper.enable_observer(observer)
            if fake_quant is not None:
                wrapper.enable_fake_quant(fake_quant)
        for key in self.point_ranges.keys():
            self.point_ranges.set_switches(key, observer, fake_quant)

    def _switch_states(self) -> List[Tuple[bool, bool]]:
        """``(observing, fake_quantizing)`` of every wrapped layer and activation point."""
        states = [(w.observing, w.fake_quantizing) for w in self.modules_wrapper.values()]
        return states + [(self.point_ranges.observing(k), self.point_ranges.fake_quantizing(k))
                         for k in self.point_ranges.keys()]

    # Hooks called by the wrappers ------------------------------------------------------------
    def quantize_weight(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``weight`` (already BN-folded where folding is simulated)."""
        cfg = wrapper.config
        scheme = cfg.scheme["weight"]
        axis = weight_axis(wrapper.module)
        lo, hi = self.weight_range(wrapper, weight)
        return fake_quant_tensor(weight, cfg.bits["weight"], scheme, cfg.dtype["weight"], lo, hi, axis)

    def weight_range(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The range the weight is quantized with: the calibrated one where the quantizer fixes it
        (:meth:`QuantizerModuleWrapper.add_weight_range`), else the weight's min/max."""
        fixed = wrapper.weight_range_buffers
        if fixed is not None:
            return fixed
        return weight_range(weight, wrapper.config.scheme["weight"], weight_axis(wrapper.module))

    def bias_scales(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(input_scale, weight_scale)`` whose product is the grid the engine's int32 bias of
        ``wrapper`` lies on, or None while its input or weight is not quantized."""
        key = wrapper.bias_point
        cfg = wrapper.config
        if key is None or key not in self.point_grids or not is_integer_bits(cfg.bits["weight"]):
            return None
        bits, scheme, dtype = self.point_grids[key]
        lo, hi = self.point_ranges[key]
        if not is_integer_bits(bits) or bool(torch.isnan(lo)):
            return None
        input_scale, _ = qparams_from_range(lo.detach(), hi.detach(), bits, scheme, dtype)
        wlo, whi = self.weight_range(wrapper, weight)
        weight_scale, _ = qparams_from_range(wlo.detach(), whi.detach(), cfg.bits["weight"], cfg.scheme["weight"],
                                             cfg.dtype["weight"])
        return input_scale, weight_scale

    def quantize_dynamic_input(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        """The input of a dynamically quantized layer as the engine computes it: uint8, per tensor,
        with the range of this very tensor (ONNX ``DynamicQuantizeLinear``)."""
        lo, hi = torch.aminmax(x.detach())
        return fake_quant_tensor(x, 8, "per_tensor_affine", "uint", lo, hi)

    def observe_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> None:
        """Update the range of ``wrapper``'s ``qtype`` ('input' or 'output') from ``x`` (called
        while the wrapper's observer is on; no-op by default)."""

    def quantize_input(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input (called while the wrapper's fake quantization is on)."""
        return self.fake_quant_activation(wrapper, "input", x)

    def quantize_output(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the output (called while the wrapper's fake quantization is on)."""
        return self.fake_quant_activation(wrapper, "output", x)

    def install_points(self, grids: Dict[PointKey, Tuple[int, str, str]],
                       fixed: Optional[Mapping[PointKey, Tuple[float, float]]] = None,
                       affine: Optional[Mapping[PointKey, Tuple[PointKey, nn.Module]]] = None) -> CallPoints:
        """Quantize the activations at ``grids``' point keys (see :mod:`.call_points`) through
        :meth:`quantize_point`, on every forward of the model from now on. Points in ``fixed``
        keep the range given there (an op's own output range) and are never observed. ``affine``
        maps a BatchNorm's output key to (its input's point, the BatchNorm): the engine runs it as
        an integer kernel whose int32 bias rounding is added there (:mod:`.integer_affine`)."""
        if self._call_points is not None:
            self._call_points.remove()
        self.point_grids = dict(grids)
        self.point_fixed = dict(fixed or {})
        self.point_affine = dict(affine or {})
        self.point_ranges = PointState(self.bound_model, list(grids))  # buffers: in the model's state_dict
        for key in grids:
            observer, fake_quant = self._initial_point_switches(key)
            self.point_ranges.set_switches(key, observer, fake_quant)
            if key in self.point_fixed:
                self.point_ranges[key] = self.point_fixed[key]
        self._call_points = CallPoints(self.bound_model, self._point_hook, keys=set(grids) | set(self.point_affine))
        if self._pending_point_state:
            self._load_pending_point_state()
        self._hide_state_from_ddp()
        return self._call_points

    def _initial_point_switches(self, key: PointKey) -> Tuple[bool, bool]:
        """``(observer, fake_quant)`` of a newly placed point (both on by default)."""
        return True, True

    def _point_hook(self, key: PointKey, x: torch.Tensor) -> torch.Tensor:
        try:
            if key in self.point_affine:
                x = self._integer_affine(key, x)
            if key not in self.point_grids:
                return x
            if self.point_ranges.observing(key) and key not in self.point_fixed:
                self.observe_point(key, x)
            if not self.point_ranges.fake_quantizing(key):
                return x
            return self.quantize_point(key, x)
        except NonFiniteTensorError as exc:
            raise NonFiniteTensorError(f"tensor {key!r}{self._point_context(key)}: {exc}") from None

    def _integer_affine(self, key: PointKey, x: torch.Tensor) -> torch.Tensor:
        """An eval-mode BatchNorm's output with the engine's int32 bias rounding (once its input
        point quantizes)."""
        source, bn = self.point_affine[key]
        if bn.training or not self.point_ranges.fake_quantizing(source):
            return x
        lo, hi = self.point_ranges[source]
        bits, scheme, dtype = self.point_grids[source]
        if not is_integer_bits(bits) or torch.isnan(lo):
            return x
        scale, _ = qparams_from_range(lo, hi, bits, scheme, dtype)
        return x + shift_rounding(bn, float(scale)).to(x)

    def _point_context(self, key: PointKey) -> str:
        """Where a point sits, for messages (placement-aware quantizers say which layer it feeds)."""
        return ""

    def observe_point(self, key: PointKey, x: torch.Tensor) -> None:
        """Update the range of point ``key`` from ``x`` (called while its observer is on; no-op by
        default)."""

    def quantize_point(self, key: PointKey, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the activation at point ``key`` with its tracked range (called while its
        fake quantization is on)."""
        bits, scheme, dtype = self.point_grids[key]
        lo, hi = self.point_ranges[key]
        if is_integer_bits(bits) and torch.isnan(lo):
            return x
        return fake_quant_tensor(x, bits, scheme, dtype, lo, hi)

    def fake_quant_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized with the tracked range of ``wrapper``'s ``qtype`` (unchanged while
        that range is unobserved)."""
        cfg = wrapper.config
        lo, hi = wrapper.tracked_range(qtype)
        if is_integer_bits(cfg.bits[qtype]) and torch.isnan(lo):
            return x
        return fake_quant_tensor(x, cfg.bits[qtype], cfg.scheme[qtype], cfg.dtype[qtype], lo, hi)

    # BatchNorm folding -----------------------------------------------------------------------
    def _attach_batchnorms(self, dummy_input: Any) -> None:
        """Find Conv->BN pairs with one forward of ``dummy_input`` and simulate their folding."""
        model = self.bound_model
        pairs = find_conv_bn_pairs(model, dummy_input)
        for conv_name, bn_name in pairs.items():
            wrapper = self.modules_wrapper.get(conv_name)
            if wrapper is not None and "weight" in wrapper.config.quant_types:
                wrapper.attach_bn(model.get_submodule(bn_name), bn_name)
                logger.info("simulating BatchNorm folding of %s into %s", bn_name, conv_name)

    # Export ----------------------------------------------------------------------------------
    def calibration_config(self) -> CalibrationConfig:
        """The calibration config (the NNI-keyed dict, see :mod:`.calibration`) of the current
        state, without writing files."""
        return validate_calibration_config(self.calibration_record().to_dict())

    def calibration_record(self) -> CalibrationRecord:
        """The calibration of the current state as a typed record (:mod:`.calibration_record`)."""
        with torch.no_grad():
            layers = {name: self._layer_calibration(wrapper) for name, wrapper in self.modules_wrapper.items()}
        return self._complete_calibration(CalibrationRecord(layers))

    def _complete_calibration(self, record: CalibrationRecord) -> CalibrationRecord:
        """Last step of :meth:`calibration_record` (placement-aware quantizers add their tensors)."""
        return record

    def _layer_calibration(self, wrapper: QuantizerModuleWrapper) -> LayerCalibration:
        cfg = wrapper.config
        weight = None
        if "weight" in cfg.quant_types:
            bits, scheme, dtype = cfg.bits["weight"], Scheme(cfg.scheme["weight"]), cfg.dtype["weight"]
            weight = QuantParams(bits)
            if is_integer_bits(bits):
                lo, hi = self.weight_range(wrapper, wrapper.effective_weight())
                scale, zp = qparams_from_range(lo, hi, bits, scheme, dtype)
                weight = QuantParams(bits, scheme, dtype, scale=[float(s) for s in scale.reshape(-1)],
                                     zero_point=[int(z) for z in zp.reshape(-1)],
                                     axis=weight_axis(wrapper.module) if scheme.per_channel else None)
        activations = {}
        for qtype in ("input", "output"):
            if qtype not in wrapper.simulated_types:
                continue
            bits = cfg.bits[qtype]
            lo, hi = wrapper.tracked_range(qtype)
            if not torch.isnan(lo):
                activations[qtype] = QuantParams(bits, cfg.scheme[qtype], cfg.dtype[qtype], float(lo), float(hi))
            elif is_integer_bits(bits):
                raise RuntimeError(f"layer {wrapper.name!r}: no {qtype} range was observed; run forward passes "
                                   "(training for QAT, calibration data for PTQ) before exporting")
            else:
                activations[qtype] = QuantParams(bits)
        return LayerCalibration(cfg.module_type, weight, folded_bn=wrapper.bn_name, quant_dynamic=cfg.dynamic,
                                **activations)

    def export_model(self, model_path: Optional[str], calibration_path: Optional[str] = None,
                     onnx_path: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
                     device: Optional[torch.device] = None) -> CalibrationConfig:
        """Write float weights (state_dict of the unwrapped model), calibration JSON and optionally
        an fp32 ONNX; return the calibration config. The wrapped model is left as it was.

        Distributed: every rank computes the calibration and the ranks compare it before anything
        is written (a lost rank or a difference is an error, and nothing is written); then rank 0
        writes the files (each atomically) and the other ranks return the same config once rank 0
        is done, so every rank can read the files right after."""
        if onnx_path is not None and input_shape is None:
            raise ValueError("onnx_path needs input_shape, e.g. input_shape=(1, 1, 28, 28)")
        calibration = self.calibration_config()
        if not self.distributed:
            write_export(unwrapped_copy(self.bound_model), calibration, model_path, calibration_path, onnx_path, input_shape,
                         device or model_device(self.bound_model))
            return calibration
        check_same_on_all_ranks(digest(calibration), "calibration before export",
                                "the ranges were not synchronised: build the quantizer after init_process_group "
                                "with distributed=None or True, and run the same training steps on every rank")
        error = None
        if rank() == 0:
            try:
                write_export(unwrapped_copy(self.bound_model), calibration, model_path, calibration_path, onnx_path, input_shape,
                         device or model_device(self.bound_model))
            except Exception as exc:  # reported to the other ranks, then raised here
                error = f"{type(exc).__name__}: {exc}"
                broadcast_outcome(error, "writing the export")
                raise
        broadcast_outcome(error, "writing the export")
        return calibration
