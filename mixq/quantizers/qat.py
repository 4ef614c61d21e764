"""Quantization-aware training (Jacob et al. 2018, as in NNI's QAT_Quantizer)."""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..compressor.config import ConfigError
from ..compressor.distributed import all_reduce_range
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

    Distributed data parallel (``distributed``: None = when a process group of several ranks is
    initialised; build the quantizer on the model before or after wrapping it in
    ``DistributedDataParallel``): every training-mode forward all-reduces each tracked tensor's
    batch min (MIN) and max (MAX) before the EMA update, so all ranks fake-quantize with the same
    scales at every step and N ranks train as one process on the union of their batches would
    (eval-mode forwards stay local). Training forwards are therefore collective, as DDP's
    backward is. Weights need nothing: DDP keeps them identical.

    Each wrapped layer and placed tensor has two switches (:meth:`enable_observer`,
    :meth:`enable_fake_quant`; per layer on the wrapper): the observer is on from the start (ranges
    are tracked in training mode), fake quantization switches on when the step count reaches the
    layer's ``quant_start_step``.

    The step counter and each layer's ``quant_start_step`` are buffers of the wrapped layers
    (``qat_steps``, ``quant_start_step``): with the tracked ranges and the switches they make the
    model's ``state_dict`` a complete QAT checkpoint, resumable on any number of ranks.
    """

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]],
                 optimizer: Optional[torch.optim.Optimizer] = None, dummy_input: Any = None,
                 fold_bn: Optional[bool] = None, ema_decay: float = 0.99,
                 backend: Optional[str] = DEFAULT_BACKEND, distributed: Optional[bool] = None) -> None:
        # everything that can be checked is checked before the model is wrapped (in place)
        fold_bn = dummy_input is not None if fold_bn is None else fold_bn
        if fold_bn and dummy_input is None:
            raise ConfigError("fold_bn=True needs dummy_input (one batch) to find the Conv->BN pairs")
        if type(ema_decay) not in (int, float) or not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")
        resolve_placement_backend(backend)
        super().__init__(model, config_list, optimizer, dummy_input, distributed)
        self.ema_decay = ema_decay
        self._steps = 0
        self._step_handle = None
        try:
            self._register_state()
            self._finish_init(self.bound_model, optimizer, dummy_input, fold_bn, backend)
        except BaseException:
            if self._step_handle is not None:
                self._step_handle.remove()
            self._restore_model()
            raise

    @property
    def steps(self) -> int:
        """Training steps counted so far (restored by ``load_state_dict``)."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        """Count ``value`` steps; a layer or tensor whose ``quant_start_step`` is crossed switches its
        fake quantization on (or off, counting back)."""
        old, self._steps = self._steps, value
        for wrapper in self.modules_wrapper.values():
            wrapper.qat_steps.fill_(value)
            start = wrapper.config.quant_start_step
            if (old >= start) != (value >= start):
                wrapper.enable_fake_quant(value >= start)
        for key in self.point_ranges.keys():
            start = self._point_start(key)
            if (old >= start) != (value >= start):
                self.point_ranges.set_switches(key, fake_quant=value >= start)

    def _register_state(self) -> None:
        """The step counter and ``quant_start_step`` as buffers of every wrapped layer."""
        ref = weakref.ref(self)

        def restore(wrapper: nn.Module, _keys: Any) -> None:
            q = ref()
            if q is None:
                return
            start, configured = int(wrapper.quant_start_step), wrapper.config.quant_start_step
            if start != configured:
                raise ConfigError(f"layer {wrapper.name!r}: the checkpoint was trained with quant_start_step={start}, "
                                  f"the config list says {configured}; build the quantizer with the checkpoint's "
                                  "config list")
            q._steps = int(wrapper.qat_steps)

        for wrapper in self.modules_wrapper.values():
            device = next((b.device for b in wrapper.module.parameters()), torch.device("cpu"))
            wrapper.register_buffer("qat_steps", torch.tensor(0, dtype=torch.long, device=device))
            wrapper.register_buffer("quant_start_step", torch.tensor(wrapper.config.quant_start_step,
                                                                     dtype=torch.long, device=device))
            wrapper.register_load_state_dict_post_hook(restore)
            wrapper.enable_fake_quant(self.steps >= wrapper.config.quant_start_step)
        self._hide_state_from_ddp()

    def _batch_range(self, x: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Min/max of ``x``; over all ranks' batches when distributed."""
        lo, hi = _minmax(x, None)
        if self.distributed:
            lo, hi = all_reduce_range(lo, hi, f"QAT range of {what}")
        return lo, hi

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

    def observe_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> None:
        """Training-mode forwards update the EMA of the batch min/max."""
        if not wrapper.training:
            return
        lo, hi = self._batch_range(x, f"layer {wrapper.name!r} {qtype}")
        tracked_min, tracked_max = wrapper.tracked_range(qtype)
        if torch.isnan(tracked_min):
            tracked_min.copy_(lo)
            tracked_max.copy_(hi)
        else:
            tracked_min.mul_(self.ema_decay).add_((1 - self.ema_decay) * lo)
            tracked_max.mul_(self.ema_decay).add_((1 - self.ema_decay) * hi)

    def _point_start(self, key: str) -> int:
        spec = self.point_plan.points.get(key)
        if spec is not None and spec.layer in self.layer_configs:
            return self.layer_configs[spec.layer].quant_start_step
        return min(cfg.quant_start_step for cfg in self.layer_configs.values())

    def _initial_point_switches(self, key: str) -> Tuple[bool, bool]:
        return True, self.steps >= self._point_start(key)

    def observe_point(self, key: str, x: torch.Tensor) -> None:
        """Training-mode forwards update the EMA of the batch min/max."""
        if not self.bound_model.training:
            return
        lo, hi = self._batch_range(x, f"tensor {key!r}")
        old_lo, old_hi = self.point_ranges[key]
        if torch.isnan(old_lo):
            self.point_ranges[key] = (lo, hi)
        else:
            d = self.ema_decay
            self.point_ranges[key] = (old_lo * d + (1 - d) * lo, old_hi * d + (1 - d) * hi)
