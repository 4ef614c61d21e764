"""Quantization-aware training (Jacob et al. 2018, as in NNI's QAT_Quantizer)."""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..compressor.config import ConfigError
from ..compressor.observers import _minmax
from ..compressor.quantizer import Quantizer
from ..compressor.wrapper import QuantizerModuleWrapper
from .placed import DEFAULT_BACKEND, PlacementMixin, resolve_placement_backend


class QAT_Quantizer(PlacementMixin, Quantizer):
    """Fake-quantizes weights (per output channel, symmetric, by default) and activations
    (ranges tracked by an EMA of batch min/max, ``ema_decay`` 0.99) with straight-through
    gradients, from ``quant_start_step`` on.

    Steps are counted by ``optimizer.step()`` when an optimizer is given (as NNI does), else by
    training-mode forward passes of the model. BatchNorm folding of Conv->BN pairs is simulated
    when ``fold_bn`` is true (default: when ``dummy_input`` is given, which is used to find the
    pairs). Without it, a following BN is folded exactly at export when weights are per-channel
    symmetric.

    ``backend`` ('onnxruntime' default, 'tensorrt', 'auto', or None for the config's literal
    module-boundary quantization) decides which activations are quantized (:mod:`.placed`):
    exactly those the engine quantizes, so the trained accuracy is the deployed one.
    """

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]],
                 optimizer: Optional[torch.optim.Optimizer] = None, dummy_input: Any = None,
                 fold_bn: Optional[bool] = None, ema_decay: float = 0.99,
                 backend: Optional[str] = DEFAULT_BACKEND) -> None:
        # everything that can be checked is checked before the model is wrapped (in place)
        fold_bn = dummy_input is not None if fold_bn is None else fold_bn
        if fold_bn and dummy_input is None:
            raise ConfigError("fold_bn=True needs dummy_input (one batch) to find the Conv->BN pairs")
        if type(ema_decay) not in (int, float) or not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")
        resolve_placement_backend(backend)
        super().__init__(model, config_list, optimizer, dummy_input)
        self.ema_decay = ema_decay
        self.steps = 0
        self._step_handle = None
        try:
            self._finish_init(model, optimizer, dummy_input, fold_bn, backend)
        except BaseException:
            if self._step_handle is not None:
                self._step_handle.remove()
            self._restore_model()
            raise

    def _finish_init(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], dummy_input: Any,
                     fold_bn: bool, backend: Optional[str]) -> None:
        if fold_bn:
            self._attach_batchnorms(dummy_input)
        ref = weakref.ref(self)
        if optimizer is not None:
            def count_step(_opt, _args, _kwargs):
                q = ref()
                if q is not None:
                    q.steps += 1
            self._step_handle = optimizer.register_step_post_hook(count_step)
        else:
            def count_forward(module, _inputs, _output):
                q = ref()
                if q is not None and module.training:
                    q.steps += 1
            count_forward._mixq_hook = True
            self._step_handle = model.register_forward_hook(count_forward)
        self._init_placement(backend, dummy_input)

    def _active(self, wrapper: QuantizerModuleWrapper) -> bool:
        return self.steps >= wrapper.config.quant_start_step

    def weights_active(self, wrapper: QuantizerModuleWrapper) -> bool:
        return self._active(wrapper)

    def quantize_weight(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> torch.Tensor:
        if not self._active(wrapper):
            return weight
        return super().quantize_weight(wrapper, weight)

    def _track(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> None:
        lo, hi = _minmax(x, None)
        tracked_min = getattr(wrapper, f"tracked_min_{qtype}")
        tracked_max = getattr(wrapper, f"tracked_max_{qtype}")
        if torch.isnan(tracked_min):
            tracked_min.copy_(lo)
            tracked_max.copy_(hi)
        else:
            tracked_min.mul_(self.ema_decay).add_((1 - self.ema_decay) * lo)
            tracked_max.mul_(self.ema_decay).add_((1 - self.ema_decay) * hi)

    def _activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> torch.Tensor:
        if wrapper.training:
            self._track(wrapper, qtype, x)
        if not self._active(wrapper):
            return x
        return self._fake_quant_activation(wrapper, qtype, x)

    def _point_start(self, key: str) -> int:
        spec = self.point_plan.points.get(key)
        if spec is not None and spec.layer in self.layer_configs:
            return self.layer_configs[spec.layer].quant_start_step
        return min(cfg.quant_start_step for cfg in self.layer_configs.values())

    def quantize_point(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if self.bound_model.training:
            lo, hi = _minmax(x, None)
            old_lo, old_hi = self.point_ranges[key]
            if torch.isnan(old_lo):
                self.point_ranges[key] = (lo, hi)
            else:
                d = self.ema_decay
                self.point_ranges[key] = (old_lo * d + (1 - d) * lo, old_hi * d + (1 - d) * hi)
        if self.steps < self._point_start(key):
            return x
        return self._fake_quant_point(key, x)

    def quantize_input(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        return self._activation(wrapper, "input", x)

    def quantize_output(self, wrapper: QuantizerModuleWrapper, x: torch.Tensor) -> torch.Tensor:
        return self._activation(wrapper, "output", x)
