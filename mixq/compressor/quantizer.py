"""The Quantizer base class: validate a config list, wrap layers in place, export calibration."""
from __future__ import annotations

import io
import logging
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..atomic_io import atomic_write
from .bn_fold import find_conv_bn_pairs
from .call_points import CallPoints, PointKey
from .calibration import CalibrationConfig, save_calibration_config, validate_calibration_config
from .layers import weight_axis
from .point_ranges import PREFIX as POINT_PREFIX, PointRanges
from .config import ConfigError, ConfigListSpec, LayerQuantConfig, module_names, is_matmul_site
from .distributed import (broadcast_outcome, check_same_on_all_ranks, digest, hide_from_ddp, rank, unwrap_parallel,
                          use_distributed)
from .observers import NonFiniteTensorError
from .fake_quant import (fake_quantize, is_integer_bits, is_per_channel, is_symmetric, qparams_from_range,
                         quant_range, simulate_float_bits)
from .wrapper import QuantizerModuleWrapper, set_submodule, unwrapped_copy

logger = logging.getLogger(__name__)


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


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def check_dummy_input(model: nn.Module, dummy_input: Any) -> None:
    """Run ``model`` once on ``dummy_input`` (eval mode, no grad, every module's mode restored)
    and raise ValueError naming the problem when it does not fit, before anything is wrapped."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            _call(model, dummy_input)
    except Exception as exc:  # whatever the model raises on the wrong input
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"dummy_input does not fit the model ({reason[:300]}); pass one batch of the inputs the "
                         "model's forward takes (a tensor, a tuple or a dict of tensors)") from None
    finally:
        for module, training in modes:
            module.training = training


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
        self.point_ranges = PointRanges(model, ())
        self._call_points: Optional[CallPoints] = None
        self._pending_point_state: Dict[str, torch.Tensor] = {}
        ref = weakref.ref(self)

        def stash(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *_: Any) -> None:
            quantizer = ref()
            if quantizer is not None and module is quantizer.bound_model:  # not a copy of the model
                quantizer._stash_point_state(state_dict, prefix)
        model.register_load_state_dict_pre_hook(stash)
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
                 for alias in module_names(self.bound_model, name) for key in wrapper._buffers]
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
            raise ConfigError(f"the checkpoint loaded into this model holds the ranges of {len(pending) // 2} "
                              f"tensors, the placement of this model and config list has {len(names) // 2}; "
                              "load a checkpoint of the same model, config list and backend")
        with torch.no_grad():
            for name, value in pending.items():
                getattr(self.bound_model, name).copy_(value)

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

    # Hooks called by the wrappers ------------------------------------------------------------
    def quantize_weight(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``weight`` (already BN-folded where folding is simulated)."""
        cfg = wrapper.config
        scheme = cfg.scheme["weight"]
        axis = weight_axis(wrapper.module)
        lo, hi = self.weight_range(wrapper, weight)
        return fake_quant_tensor(weight, cfg.bits["weight"], scheme, cfg.dtype["weight"], lo, hi, axis)

    def weight_range(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The range the weight is quantized with (min/max by default)."""
        return weight_range(weight, wrapper.config.scheme["weight"], weight_axis(wrapper.module))

    def bias_scales(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(input_scale, weight_scale)`` whose product is the grid the engine's int32 bias of
        ``wrapper`` lies on, or None while its input or weight is not quantized."""
        key = wrapper.bias_point
        cfg = wrapper.config
        if key is None or key not in self.point_grids or not self.weights_active(wrapper) \
                or not is_integer_bits(cfg.bits["weight"]):
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
        with the range of this very tensor (ONNX ``DynamicQuantizeLinear``), whenever the layer's
        weight is quantized."""
        if not self.weights_active(wrapper):
            return x
        lo, hi = torch.aminmax(x.detach())
        return fake_quant_tensor(x, 8, "per_tensor_affine", "uint", lo, hi)

    def weights_active(self, wrapper: QuantizerModuleWrapper) -> bool:
        """Whether the layer's weight is fake-quantized now (quantizers with phases override it)."""
        return True

    def quantize_input(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        return x

    def quantize_output(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        return x

    def install_points(self, grids: Dict[PointKey, Tuple[int, str, str]]) -> CallPoints:
        """Quantize the activations at ``grids``' point keys (see :mod:`.call_points`) through
        :meth:`quantize_point`, on every forward of the model from now on."""
        if self._call_points is not None:
            self._call_points.remove()
        self.point_grids = dict(grids)
        self.point_ranges = PointRanges(self.bound_model, list(grids))  # buffers: in the model's state_dict
        self._call_points = CallPoints(self.bound_model, self._point_hook, keys=set(grids))
        if self._pending_point_state:
            self._load_pending_point_state()
        self._hide_state_from_ddp()
        return self._call_points

    def _point_hook(self, key: PointKey, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.quantize_point(key, x)
        except NonFiniteTensorError as exc:
            raise NonFiniteTensorError(f"tensor {key!r}{self._point_context(key)}: {exc}") from None

    def _point_context(self, key: PointKey) -> str:
        """Where a point sits, for messages (placement-aware quantizers say which layer it feeds)."""
        return ""

    def quantize_point(self, key: PointKey, x: torch.Tensor) -> torch.Tensor:
        """Observe and/or fake-quantize the activation at point ``key`` (identity by default)."""
        return x

    def _fake_quant_point(self, key: PointKey, x: torch.Tensor) -> torch.Tensor:
        bits, scheme, dtype = self.point_grids[key]
        lo, hi = self.point_ranges[key]
        if is_integer_bits(bits) and torch.isnan(lo):
            return x
        return fake_quant_tensor(x, bits, scheme, dtype, lo, hi)

    def _fake_quant_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> torch.Tensor:
        cfg = wrapper.config
        lo, hi = getattr(wrapper, f"tracked_min_{qtype}"), getattr(wrapper, f"tracked_max_{qtype}")
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
        """The calibration config (dict keyed by module name) of the current state, without writing files."""
        config: CalibrationConfig = {}
        with torch.no_grad():
            for name, wrapper in self.modules_wrapper.items():
                config[name] = self._layer_calibration(wrapper)
        return self._complete_calibration(config)

    def _complete_calibration(self, config: CalibrationConfig) -> CalibrationConfig:
        """Last step of :meth:`calibration_config` (placement-aware quantizers add their tensors)."""
        return validate_calibration_config(config)

    def _layer_calibration(self, wrapper: QuantizerModuleWrapper) -> Dict[str, Any]:
        cfg = wrapper.config
        entry: Dict[str, Any] = {"type": cfg.module_type}
        if "weight" in cfg.quant_types:
            bits = cfg.bits["weight"]
            entry["weight_bits"] = bits
            if is_integer_bits(bits):
                scheme, axis = cfg.scheme["weight"], weight_axis(wrapper.module)
                weight = wrapper.effective_weight()
                lo, hi = self.weight_range(wrapper, weight)
                scale, zp = qparams_from_range(lo, hi, bits, scheme, cfg.dtype["weight"])
                entry.update(weight_scale=[float(s) for s in scale.reshape(-1)],
                             weight_zero_point=[int(z) for z in zp.reshape(-1)],
                             weight_scheme=scheme, weight_dtype=cfg.dtype["weight"],
                             weight_axis=axis if is_per_channel(scheme) else None,
                             folded_bn=wrapper.bn_name)
            if cfg.dynamic:
                entry["quant_dynamic"] = True
        for qtype in ("input", "output"):
            if qtype not in wrapper.simulated_types:
                continue
            bits = cfg.bits[qtype]
            entry[f"{qtype}_bits"] = bits
            lo, hi = getattr(wrapper, f"tracked_min_{qtype}"), getattr(wrapper, f"tracked_max_{qtype}")
            if torch.isnan(lo):
                if is_integer_bits(bits):
                    raise RuntimeError(f"layer {wrapper.name!r}: no {qtype} range was observed; run forward passes "
                                       "(training for QAT, calibration data for PTQ) before exporting")
                continue
            entry.update({f"tracked_min_{qtype}": float(lo), f"tracked_max_{qtype}": float(hi),
                          f"{qtype}_scheme": cfg.scheme[qtype], f"{qtype}_dtype": cfg.dtype[qtype]})
        return entry

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
            self._write_export(calibration, model_path, calibration_path, onnx_path, input_shape, device)
            return calibration
        check_same_on_all_ranks(digest(calibration), "calibration before export",
                                "the ranges were not synchronised: build the quantizer after init_process_group "
                                "with distributed=None or True, and run the same training steps on every rank")
        error = None
        if rank() == 0:
            try:
                self._write_export(calibration, model_path, calibration_path, onnx_path, input_shape, device)
            except Exception as exc:  # reported to the other ranks, then raised here
                error = f"{type(exc).__name__}: {exc}"
                broadcast_outcome(error, "writing the export")
                raise
        broadcast_outcome(error, "writing the export")
        return calibration

    def _write_export(self, calibration: CalibrationConfig, model_path: Optional[str], calibration_path: Optional[str],
                      onnx_path: Optional[str], input_shape: Optional[Sequence[int]],
                      device: Optional[torch.device]) -> None:
        float_model = unwrapped_copy(self.bound_model)
        if model_path is not None:
            _atomic_torch_save(float_model.state_dict(), model_path)
            logger.info("float weights saved to %s", model_path)
        if calibration_path is not None:
            save_calibration_config(calibration, calibration_path)
            logger.info("calibration config saved to %s", calibration_path)
        if onnx_path is not None:
            device = device or next(self.bound_model.parameters()).device
            export_fp32_onnx(float_model, torch.randn(*input_shape, device=device), onnx_path)
            logger.info("fp32 ONNX saved to %s", onnx_path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def export_fp32_onnx(model: nn.Module, dummy_input: torch.Tensor, path: str) -> None:
    """Plain fp32 ONNX (TorchScript exporter, dynamic batch axis), written atomically."""
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(model, (dummy_input,), buffer, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
    finally:
        model.train(was_training)
    for w in caught:  # the exporter's notices are noise; a TracerWarning says the graph may be wrong
        if issubclass(w.category, torch.jit.TracerWarning):
            logger.warning("exporting %s: %s (%s:%d)", path, w.message, w.filename, w.lineno)
    atomic_write(path, buffer.getvalue())
