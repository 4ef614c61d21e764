"""The module wrapper that puts fake quantization around one layer, in place, as NNI does."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call

from .call_points import strip_hooks
from .calibration import layer_key
from .config import LayerQuantConfig
from .fake_quant import is_per_channel
from .layers import bn_factor, weight_axis
from .point_state import remove_point_buffers
from .observers import NonFiniteTensorError


class QuantizerModuleWrapper(nn.Module):
    """Wraps ``module`` (kept as ``.module``, parameters untouched) and asks its quantizer to
    fake-quantize the input, weight and output that ``config`` selects.

    Activation ranges live in buffers ``tracked_min_input`` etc. (NaN until observed), and the
    quantizer's observers of this layer are submodules (``observers['input']``...), so they
    follow the model across devices and state dicts.

    Two switches, as in ``torch.ao.quantization.FakeQuantize``: :meth:`enable_observer` (the
    quantizer updates this layer's ranges) and :meth:`enable_fake_quant` (the layer runs
    quantized; off, it runs as the float module). They are buffers ``observer_enabled`` /
    ``fake_quant_enabled`` (round-tripping through ``state_dict``) mirrored in the plain bools
    :attr:`observing` / :attr:`fake_quantizing` that the forward reads.
    """

    is_mixq_wrapper = True  # the class marker mixq.compressor.wrapped.is_wrapper reads

    def __init__(self, module: nn.Module, name: str, config: LayerQuantConfig, quantizer: Any) -> None:
        super().__init__()
        self.module = module
        self.name = name
        self.config = config
        self.__dict__["_quantizer"] = quantizer  # a plain reference: NNI code may drop its own
        self.__dict__["bn"] = None  # a following BatchNorm whose folding is simulated (not a submodule)
        self.bn_name: Optional[str] = None
        # where the engine adds the bias in int32 (see set_integer_bias)
        self.bias_point: Optional[str] = None
        self.__dict__["export_bn"] = None
        # the quant types this wrapper fake-quantizes itself; a placement-aware quantizer keeps
        # only 'weight' here and quantizes activations where the backend places them
        self.simulated_types: List[str] = list(config.quant_types)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        for qtype in ("input", "output"):
            if qtype in config.quant_types:
                for field in ("tracked_min", "tracked_max"):
                    self.register_buffer(layer_key(qtype, field), torch.tensor(float("nan"), device=device))
        self.observers = nn.ModuleDict()
        self.register_buffer("observer_enabled", torch.tensor(True, device=device))
        self.register_buffer("fake_quant_enabled", torch.tensor(True, device=device))
        self.observing = True
        self.fake_quantizing = True

    def enable_observer(self, enabled: bool = True) -> None:
        """Let the quantizer update this layer's ranges (``False``: freeze them)."""
        self.observing = bool(enabled)
        self.observer_enabled.fill_(self.observing)

    def disable_observer(self) -> None:
        """Freeze this layer's ranges."""
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Run this layer quantized (``False``: as the float module)."""
        self.fake_quantizing = bool(enabled)
        self.fake_quant_enabled.fill_(self.fake_quantizing)

    def disable_fake_quant(self) -> None:
        """Run this layer as the float module."""
        self.enable_fake_quant(False)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.observing = bool(self.observer_enabled)
        self.fake_quantizing = bool(self.fake_quant_enabled)

    def add_weight_range(self) -> None:
        """Buffers ``tracked_min_weight`` / ``tracked_max_weight`` (NaN until set) for a quantizer
        that fixes the weight range by calibration instead of taking the weight's min/max."""
        w = self.module.weight
        per_channel = is_per_channel(self.config.scheme["weight"])
        shape = (w.shape[weight_axis(self.module)],) if per_channel else ()
        for field in ("tracked_min", "tracked_max"):
            self.register_buffer(layer_key("weight", field), torch.full(shape, float("nan"), device=w.device))

    def tracked_range(self, qtype: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` buffers of ``qtype`` ('input', 'output'; 'weight' after
        :meth:`add_weight_range`), assignable in place (``copy_``)."""
        return self._buffers[layer_key(qtype, "tracked_min")], self._buffers[layer_key(qtype, "tracked_max")]

    @property
    def weight_range_buffers(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The weight's :meth:`tracked_range` after :meth:`add_weight_range`, else None."""
        if layer_key("weight", "tracked_min") not in self._buffers:
            return None
        return self.tracked_range("weight")

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks are the wrapped module's (``layer.weight``, ``layer.in_features``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__["_modules"].get("module")
            if module is None:
                raise
            return getattr(module, name)

    @property
    def quantizer(self) -> Any:
        """The quantizer that wrapped this layer."""
        return self.__dict__["_quantizer"]

    def attach_bn(self, bn: nn.Module, bn_name: str) -> None:
        """Simulate folding ``bn`` into this conv's weight (the BN module itself still runs)."""
        self.__dict__["bn"] = bn
        self.bn_name = bn_name

    def set_integer_bias(self, point: Optional[str], export_bn: Optional[nn.Module]) -> None:
        """The engine holds this layer's bias (with ``export_bn`` folded in, the BatchNorm the
        export folds into it) as int32 codes on the grid ``scale(point) * weight_scale``: simulate
        that rounding. ``point=None``: the bias stays float."""
        self.bias_point = point
        self.__dict__["export_bn"] = export_bn

    def bn_scale(self) -> torch.Tensor:
        """Per-output-channel factor gamma / sqrt(running_var + eps) of the attached BN."""
        return bn_factor(self.__dict__["bn"])

    def effective_weight(self) -> torch.Tensor:
        """The weight that is quantized: the module weight, BN-folded when a BN is attached."""
        w = self.module.weight
        if self.__dict__["bn"] is None:
            return w
        return w * self.bn_scale().reshape([-1] + [1] * (w.dim() - 1))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        q = self.quantizer
        types = self.simulated_types
        try:
            if "input" in types:
                if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
                    raise TypeError(f"layer {self.name!r} ({self.config.module_type}) is configured for input "
                                    "quantization, which needs exactly one tensor input; drop 'input' from its quant_types")
                args = (self._activation(q, "input", args[0]),)
            if self.config.dynamic and self.fake_quantizing and args and torch.is_tensor(args[0]):
                args = (q.quantize_dynamic_input(self, args[0]),) + tuple(args[1:])
            out = self._forward_weight(q, args, kwargs) if "weight" in types else self.module(*args, **kwargs)
            if "output" in types:
                if not torch.is_tensor(out):
                    raise TypeError(f"layer {self.name!r} ({self.config.module_type}) is configured for output "
                                    "quantization, which needs one tensor output; drop 'output' from its quant_types")
                out = self._activation(q, "output", out)
        except NonFiniteTensorError as exc:
            raise NonFiniteTensorError(f"layer {self.name!r}: {exc}") from None
        return out

    def _activation(self, q: Any, qtype: str, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            q.observe_activation(self, qtype, x)
        if not self.fake_quantizing:
            return x
        return q.quantize_input(self, x) if qtype == "input" else q.quantize_output(self, x)

    def _forward_weight(self, q: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        weight = self.effective_weight()
        qweight = q.quantize_weight(self, weight) if self.fake_quantizing else weight
        attached = self.__dict__["bn"]
        scales = q.bias_scales(self, weight) if self.bias_point is not None and self.fake_quantizing else None
        if attached is None and scales is None:
            return functional_call(self.module, {"weight": qweight}, args, kwargs)
        params = {"weight": qweight}
        if self.module.bias is not None:
            params["bias"] = torch.zeros_like(self.module.bias)
        out = functional_call(self.module, params, args, kwargs)
        shape = [1, -1] + [1] * (out.dim() - 2)
        if attached is not None:
            out = out / _nonzero(bn_factor(attached)).reshape(shape)
        return out + self._engine_bias(scales, out.shape[1]).reshape(shape)

    def _engine_bias(self, scales: Optional[tuple], channels: int) -> torch.Tensor:
        """The bias as the engine adds it, in this module's output frame (before the BatchNorm,
        which still runs): BN folded in, rounded to the int32 grid, unfolded again."""
        bias = self.module.bias
        if bias is None:
            bias = self.module.weight.new_zeros(channels)
        if scales is None:
            return bias
        input_scale, weight_scale = scales
        attached = self.__dict__["bn"]
        bn = attached if attached is not None else self.__dict__["export_bn"]
        if bn is None:
            return _round_to_grid(bias, input_scale * weight_scale)
        factor = bn_factor(bn)
        if attached is None:  # the weight was quantized unfolded: the export scales its grid by |factor|
            weight_scale = weight_scale * factor.abs()
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        folded = (bias - bn.running_mean) * factor + beta
        unfolded = (_round_to_grid(folded, input_scale * weight_scale) - beta) / _nonzero(factor) + bn.running_mean
        return torch.where(factor == 0, bias, unfolded)  # gamma 0: BN ignores this channel


_INT32_MAX = 2 ** 31 - 1


def _nonzero(factor: torch.Tensor) -> torch.Tensor:
    return torch.where(factor == 0, torch.ones_like(factor), factor)


def _round_to_grid(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded to multiples of ``step`` as the engine's int32 codes hold it (computed in
    float64, as the export does; the gradient passes straight through). A bias beyond the int32
    range stays float in the engine, and here."""
    step = torch.broadcast_to(step.to(bias.device), bias.shape).detach()
    codes = torch.round(bias.detach().double() / step.double())
    if bool((codes.abs() > _INT32_MAX).any()):
        return bias
    return bias + ((codes * step.double()).to(bias.dtype) - bias).detach()


def unwrapped_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every wrapper replaced by its original float module.

    Forward hooks that a quantizer put on the model are not copied.
    """
    memo = {id(m.quantizer): m.quantizer for m in model.modules() if isinstance(m, QuantizerModuleWrapper)}
    clone = copy.deepcopy(model, memo)
    strip_hooks(clone)
    remove_point_buffers(clone)  # the quantizer's state, not the model's
    wrappers = [(n, m) for n, m in clone.named_modules(remove_duplicate=False) if isinstance(m, QuantizerModuleWrapper)]
    for name, wrapper in wrappers:  # every name: a module may be registered twice (self.alias = self.conv)
        set_submodule(clone, name, wrapper.module)
    return clone


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
