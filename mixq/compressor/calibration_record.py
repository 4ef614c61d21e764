"""The calibration as typed records: one :class:`QuantParams` per quantized tensor type of a
layer, a :class:`LayerCalibration` per layer, a :class:`CalibrationRecord` for the whole.

The NNI-keyed dict of :mod:`.calibration` (and its versioned JSON file) is their serialised
form: :meth:`CalibrationRecord.to_dict` gives exactly the dict a quantizer exports, and
:meth:`CalibrationRecord.from_dict` reads one, validated, with the same messages as
:func:`~mixq.compressor.calibration.validate_calibration_config`. Quantizers build records;
the speedup reads them; users keep reading and writing the dicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple

from .calibration import (PLACEMENT_KEY, TENSORS_KEY, CalibrationConfig, layer_entries, layer_key,
                          validate_calibration_config)
from .config import QUANT_TYPES
from .fake_quant import is_integer_bits
from .scheme import Scheme

# the fields of QuantParams that a layer entry holds, per quant type ('axis' is handled apart)
_WEIGHT_FIELDS = ("bits", "scale", "zero_point", "scheme", "dtype")
_ACTIVATION_FIELDS = ("bits", "tracked_min", "tracked_max", "scheme", "dtype")
_TENSOR_FIELDS = ("bits", "scheme", "dtype", "tracked_min", "tracked_max")


@dataclass(frozen=True)
class QuantParams:
    """How one tensor is quantized: ``bits`` (1..8 an integer grid, 16 fp16, 32 fp32), its
    ``scheme`` and ``dtype`` ('int' | 'uint'), and what calibration measured: the tracked range
    of an activation, or the scales and zero points of a weight (along ``axis`` per channel).
    A field the calibration does not hold is None."""

    bits: int
    scheme: Optional[Scheme] = None
    dtype: Optional[str] = None
    tracked_min: Optional[float] = None
    tracked_max: Optional[float] = None
    scale: Optional[Tuple[float, ...]] = None
    zero_point: Optional[Tuple[int, ...]] = None
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        if self.scheme is not None:
            object.__setattr__(self, "scheme", Scheme(self.scheme))
        for name in ("scale", "zero_point"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def integer(self) -> bool:
        """Quantized on an integer grid (1..8 bits)."""
        return is_integer_bits(self.bits)

    @property
    def has_range(self) -> bool:
        """An activation's range was measured."""
        return self.tracked_min is not None and self.tracked_max is not None

    def to_layer_keys(self, qtype: str) -> Dict[str, Any]:
        """The NNI keys of ``qtype`` in a layer entry (``weight_bits``, ``tracked_min_input``...)."""
        fields = _WEIGHT_FIELDS if qtype == "weight" else _ACTIVATION_FIELDS
        keys = {layer_key(qtype, f): _plain(getattr(self, f)) for f in fields if getattr(self, f) is not None}
        if qtype == "weight" and self.scale is not None:  # null for a per-tensor weight
            keys[layer_key(qtype, "axis")] = self.axis
        return keys

    @classmethod
    def from_layer_keys(cls, entry: Mapping[str, Any], qtype: str) -> Optional["QuantParams"]:
        """``qtype``'s params in a layer entry; None where the entry does not quantize it."""
        if layer_key(qtype, "bits") not in entry:
            return None
        fields = _WEIGHT_FIELDS + ("axis",) if qtype == "weight" else _ACTIVATION_FIELDS
        return cls(**{f: entry.get(layer_key(qtype, f)) for f in fields})

    def to_tensor_entry(self) -> Dict[str, Any]:
        """The entry of a placed tensor in ``'@tensors'``."""
        return {f: _plain(getattr(self, f)) for f in _TENSOR_FIELDS}

    @classmethod
    def from_tensor_entry(cls, entry: Mapping[str, Any]) -> "QuantParams":
        return cls(**{f: entry[f] for f in _TENSOR_FIELDS})


def _plain(value: Any) -> Any:
    """A field as the dict holds it: a scheme's string, lists for sequences."""
    if isinstance(value, Scheme):
        return value.value
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class LayerCalibration:
    """One layer's calibration: its module ``type``, the params of each quantized type, the
    BatchNorm its weight scales include (``folded_bn``) and whether its activations are
    quantized at run time (``quant_dynamic``)."""

    type: Optional[str] = None
    weight: Optional[QuantParams] = None
    input: Optional[QuantParams] = None
    output: Optional[QuantParams] = None
    folded_bn: Optional[str] = None
    quant_dynamic: bool = False

    def params(self, qtype: str) -> Optional[QuantParams]:
        """The params of ``qtype`` ('weight', 'input' or 'output'), None when not quantized."""
        if qtype not in QUANT_TYPES:
            raise ValueError(f"quant type must be one of {list(QUANT_TYPES)}, got {qtype!r}")
        return getattr(self, qtype)

    @property
    def quant_types(self) -> Tuple[str, ...]:
        """The quantized types, in ('weight', 'input', 'output') order."""
        return tuple(q for q in QUANT_TYPES if getattr(self, q) is not None)

    def replace(self, **changes: Any) -> "LayerCalibration":
        """A copy with ``changes`` (e.g. ``input=None``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The NNI-keyed entry."""
        entry: Dict[str, Any] = {} if self.type is None else {"type": self.type}
        if self.weight is not None:
            entry.update(self.weight.to_layer_keys("weight"))
            if self.weight.scale is not None:
                entry["folded_bn"] = self.folded_bn
        if self.quant_dynamic:
            entry["quant_dynamic"] = True
        for qtype in ("input", "output"):
            params = getattr(self, qtype)
            if params is not None:
                entry.update(params.to_layer_keys(qtype))
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> "LayerCalibration":
        """From a (validated) NNI-keyed entry."""
        return cls(type=entry.get("type"), folded_bn=entry.get("folded_bn"),
                   quant_dynamic=bool(entry.get("quant_dynamic", False)),
                   **{q: QuantParams.from_layer_keys(entry, q) for q in QUANT_TYPES})


@dataclass(frozen=True)
class CalibrationRecord:
    """A whole calibration: the layers (by module name), and where a backend placement was
    simulated, its placed ``tensors`` (by point key, with the graph tensor name where known)
    and that ``backend``. Read-only; :meth:`to_dict` / :meth:`from_dict` convert."""

    layers: Mapping[str, LayerCalibration]
    tensors: Optional[Mapping[str, QuantParams]] = None
    tensor_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.tensors is None) != (self.backend is None):
            raise ValueError("a calibration record has placed tensors and their backend, or neither")
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "tensor_names", MappingProxyType(dict(self.tensor_names)))
        if self.tensors is not None:
            object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def to_dict(self) -> CalibrationConfig:
        """The NNI-keyed dict (new objects throughout: the caller may change it)."""
        config: CalibrationConfig = {name: layer.to_dict() for name, layer in self.layers.items()}
        if self.tensors is not None:
            tensors = {}
            for key, params in self.tensors.items():
                tensors[key] = params.to_tensor_entry()
                if key in self.tensor_names:
                    tensors[key]["tensor"] = self.tensor_names[key]
            config[TENSORS_KEY] = tensors
            config[PLACEMENT_KEY] = {"backend": self.backend}
        return config

    @classmethod
    def from_dict(cls, config: Any) -> "CalibrationRecord":
        """Validate an NNI-keyed calibration dict (raising
        :class:`~mixq.compressor.calibration.CalibrationError` as the file loader does) and read it."""
        validate_calibration_config(config)
        layers = {name: LayerCalibration.from_dict(entry) for name, entry in layer_entries(config).items()}
        if TENSORS_KEY not in config:
            return cls(layers)
        entries = config[TENSORS_KEY]
        return cls(layers, tensors={k: QuantParams.from_tensor_entry(e) for k, e in entries.items()},
                   tensor_names={k: e["tensor"] for k, e in entries.items() if "tensor" in e},
                   backend=config[PLACEMENT_KEY]["backend"])
