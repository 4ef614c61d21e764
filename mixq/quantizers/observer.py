"""Post-training quantization with range observers (calibrate, then compress, then export)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from schema import And, Or

from ..compressor.calibration_record import CalibrationRecord
from ..compressor.config import QUANT_TYPES, ConfigListSpec
from ..compressor.observers import OBSERVERS, Observer, make_observer
from ..compressor.layers import weight_axis
from ..compressor.model_io import model_device
from ..compressor.quantizer import Quantizer
from ..compressor.fake_quant import is_per_channel
from ..compressor.wrapper import QuantizerModuleWrapper
from .placed import DEFAULT_BACKEND, PlacementMixin, resolve_placement_backend

_observer_spec = Or(Or(*OBSERVERS), And(dict, lambda d: d.get("name") in OBSERVERS),
                    error=f"observer must be one of {sorted(OBSERVERS)} or a dict with 'name' and its options")
DEFAULT_OBSERVER = "minmax"


class ObserverQuantizer(PlacementMixin, Quantizer):
    """PTQ: wrap, run calibration forwards (eval mode; the observers are on and fake quantization
    off, so the layers run in float and are observed), ``compress()`` (ranges are computed, the
    observers switch off and fake quantization on), ``export_model``. The observers are modules:
    a layer's are submodules of its wrapper (``conv1.observers.weight``), in the model's
    ``state_dict``; those of the tensors the backend places are in :attr:`point_observers`, and
    their ranges, after ``compress()``, in the model's ``state_dict``.

    The observer is chosen per entry with ``'observer'``: a name (``'minmax'``,
    ``'moving_average'``, ``'percentile'``, ``'mse'``), a dict ``{'name': ..., **options}``, or a
    dict per quant type ``{'weight': 'mse', 'input': 'percentile'}``. Default: ``'minmax'``.

    ``backend`` ('onnxruntime' default, 'tensorrt', 'auto', or None for the config's literal
    module-boundary quantization) decides where activations are observed and quantized
    (:mod:`.placed`); tensors the backend adds (residual Adds, Concats...) use min/max.

    Calibration split across ``torch.distributed`` ranks (``distributed``: None = when a process
    group of several ranks is initialised): each rank runs its shard, any number of batches;
    ``compress()`` (on every rank) merges the activation observers' statistics, so the ranges equal
    those of one process that saw all shards: min/max exactly, percentile/MSE from the histograms
    re-binned onto the global range and summed; ``moving_average`` takes the mean of the ranks'
    averages. Weights are not merged: every rank holds the same weights.
    """

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]], dummy_input: Any = None,
                 backend: Optional[str] = DEFAULT_BACKEND, **kwargs: Any) -> None:
        resolve_placement_backend(backend)  # a bad backend is refused before the model is wrapped
        super().__init__(model, config_list, dummy_input=dummy_input, **kwargs)
        self.point_observers: Dict[str, Observer] = {}
        self._init_placement(backend, dummy_input)
        for name, wrapper in self.modules_wrapper.items():
            for qtype in wrapper.config.quant_types:
                if qtype == "weight" or qtype in wrapper.simulated_types:
                    axis = weight_axis(wrapper.module) if qtype == "weight" and is_per_channel(
                        wrapper.config.scheme["weight"]) else None
                    wrapper.observers[qtype] = make_observer(self._observer_choice(name, qtype), axis).to(
                        model_device(wrapper.module))
            if "weight" in wrapper.config.quant_types:
                wrapper.add_weight_range()
            wrapper.disable_fake_quant()  # calibration forwards run in float
        self._hide_state_from_ddp()

    def _observer_choice(self, layer: Optional[str], qtype: Optional[str]) -> Any:
        if layer is None or layer not in self.layer_configs:
            return DEFAULT_OBSERVER
        spec = self.layer_configs[layer].extra.get("observer", DEFAULT_OBSERVER)
        return spec.get(qtype, DEFAULT_OBSERVER) if isinstance(spec, dict) and "name" not in spec else spec

    @property
    def compressed(self) -> bool:
        """Whether :meth:`compress` has turned the observations into ranges (no observer is on)."""
        states = self._switch_states()
        return bool(states) and not any(observing for observing, _ in states)

    def _initial_point_switches(self, key: str) -> Tuple[bool, bool]:
        return True, False  # observe during calibration, quantize after compress()

    def _on_points_placed(self) -> None:
        device = model_device(self.bound_model)
        self.point_observers = {key: make_observer(self._observer_choice(spec.layer, spec.kind), None).to(device)
                                for key, spec in self.point_plan.points.items() if not spec.fixed}

    def observe_point(self, key: str, x: torch.Tensor) -> None:
        self.point_observers[key].update(x)

    @classmethod
    def config_spec(cls) -> ConfigListSpec:
        per_type = Or(_observer_spec, {Or(*QUANT_TYPES): _observer_spec})
        return ConfigListSpec(extra_keys={"observer": per_type}, quantizer=cls.__name__)

    def observe_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> None:
        wrapper.observers[qtype].update(x)

    def compress(self) -> nn.Module:
        """Turn the observations into ranges, switch the observers off and fake quantization on."""
        if self.backend is not None:
            self._require_placement()
        with torch.no_grad():
            if self.distributed:
                self._merge_observers()
            for key, observer in self.point_observers.items():
                bits, scheme, dtype = self.point_grids[key]
                if not observer.has_data:
                    raise RuntimeError(f"tensor {key!r} saw no data during calibration: run calibration forwards "
                                       "through the wrapped model before compress()")
                self.point_ranges[key] = observer.compute_range(bits, scheme, dtype)
            for name, wrapper in self.modules_wrapper.items():
                cfg = wrapper.config
                for qtype, observer in wrapper.observers.items():
                    if qtype == "weight":
                        observer.update(wrapper.effective_weight())
                    elif not observer.has_data:
                        raise RuntimeError(f"layer {name!r} saw no {qtype} during calibration: run calibration "
                                           "forwards through the wrapped model before compress()")
                    for buffer, value in zip(wrapper.tracked_range(qtype),
                                             observer.compute_range(cfg.bits[qtype], cfg.scheme[qtype], cfg.dtype[qtype])):
                        buffer.copy_(value)
        self.disable_observer()
        self.enable_fake_quant()
        return self.bound_model

    def _merge_observers(self) -> None:
        """Every activation observer takes the statistics of all ranks (collectives, in the same
        order on every rank: placement order, then layers)."""
        for observer in self.point_observers.values():
            observer.merge_across_ranks()
        for wrapper in self.modules_wrapper.values():
            for qtype, observer in wrapper.observers.items():
                if qtype != "weight":
                    observer.merge_across_ranks()

    def calibration_record(self) -> CalibrationRecord:
        if not self.compressed:
            raise RuntimeError("ObserverQuantizer: call compress() after the calibration forwards, then export")
        return super().calibration_record()
