"""The calibration config: what a quantizer measured, per layer, in a versioned JSON file.

In memory it is a dict keyed by module name with NNI 2.x keys, e.g.::

    {'conv1': {'type': 'Conv2d',
               'weight_bits': 8, 'weight_scale': [...], 'weight_zero_point': [...],
               'weight_scheme': 'per_channel_symmetric', 'weight_axis': 0, 'weight_dtype': 'int',
               'input_bits': 8, 'tracked_min_input': -0.42, 'tracked_max_input': 2.8,
               'input_scheme': 'per_tensor_symmetric', 'input_dtype': 'int'}}

Keys of a quant type are present only when that type is quantized. Ranges and scales are
present only for integer bit widths (1..8); 16 bits means fp16 and 32 bits fp32.

A quantizer that follows a backend's placement (:mod:`mixq.quantizers.placed`) adds two
reserved entries: ``'@tensors'``, the range and grid of every tensor the backend quantizes, by
point key (:mod:`.call_points`; e.g. ``'layer1.0@0/add_#0'``), and ``'@placement'``,
``{'backend': 'onnxruntime'}``. The per-layer activation keys then repeat, for NNI users, the
range of the tensor that serves the layer's input/output.

This dict is the serialised form of the typed :class:`~mixq.compressor.calibration_record.CalibrationRecord`
(quantizers build records, the speedup reads them); it stays the public form because NNI users
index, edit and write these dicts. :func:`layer_key` is the one place the NNI keys are spelt.

On disk: ``{"format": "mixq-calibration", "version": 2, "layers": {...}, "tensors": {...},
"placement": {...}}`` (version 1 files, without the last two, still load). Loading never
executes anything (plain JSON) and validates every field.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict

import numpy as np
from schema import And, Or, Schema, SchemaError
from schema import Optional as Opt

from ..atomic_io import atomic_write
from ..messages import short_repr
from .config import ALLOWED_BITS, BITS_HELP, QUANT_TYPES
from .fake_quant import DTYPES, is_integer_bits, is_per_channel, is_symmetric, quant_range
from .scheme import SCHEMES

FORMAT_NAME = "mixq-calibration"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS_KEY = "@tensors"
PLACEMENT_KEY = "@placement"
RESERVED_KEYS = (TENSORS_KEY, PLACEMENT_KEY)

CalibrationConfig = Dict[str, Dict[str, Any]]
MAX_FILE_BYTES = 256 * 2 ** 20  # per-channel scales of a 7B-parameter model take ~20 MB

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and abs(v) <= _F32_MAX


_finite = And(_number, error="must be a finite number within the float32 range")
_bits = And(lambda b: type(b) is int and b in ALLOWED_BITS, error=f"must be {BITS_HELP}")
_int = And(lambda v: type(v) is int, error="must be an int")
_scheme = Or(*SCHEMES, error=f"must be one of {list(SCHEMES)}")
_dtype = Or(*DTYPES, error=f"must be one of {list(DTYPES)}")


def layer_key(qtype: str, field: str) -> str:
    """The NNI key of one field of a quant type in a layer entry: ``('weight', 'scale')`` ->
    ``'weight_scale'``, ``('input', 'tracked_min')`` -> ``'tracked_min_input'``."""
    return f"{field}_{qtype}" if field.startswith("tracked_") else f"{qtype}_{field}"


_WEIGHT_FIELDS = {
    "bits": _bits,
    "scale": And(list, len, lambda v: all(_number(s) and s >= _F32_TINY for s in v),
                 error=f"must be a non-empty list of positive float32 numbers ({_F32_TINY:.3g} .. {_F32_MAX:.3g})"),
    "zero_point": And(list, len, lambda v: all(type(z) is int for z in v), error="must be a non-empty list of ints"),
    "scheme": _scheme,
    "axis": Or(None, And(_int, lambda a: a >= 0), error="must be an int >= 0 or null"),
    "dtype": _dtype,
}
_ACTIVATION_FIELDS = {"bits": _bits, "tracked_min": _finite, "tracked_max": _finite, "scheme": _scheme,
                      "dtype": _dtype}
_FIELDS = {"type": And(str, error="must be a module type name"),
           **{layer_key("weight", f): v for f, v in _WEIGHT_FIELDS.items()},
           "folded_bn": Or(None, str, error="must be a module name or null"),
           "quant_dynamic": Schema(bool),
           **{layer_key(q, f): v for q in ("input", "output") for f, v in _ACTIVATION_FIELDS.items()}}


_TENSOR_FIELDS = Schema({"bits": And(lambda b: type(b) is int and is_integer_bits(b), error="must be an int in 1..8"),
                         "scheme": _scheme, "dtype": _dtype, "tracked_min": _finite, "tracked_max": _finite,
                         Opt("tensor"): And(str, lambda t: len(t) < 1000, error="must be a tensor name")})
_PLACEMENT_FIELDS = Schema({"backend": Or("onnxruntime", "tensorrt", "openvino",
                                           error="backend must be 'onnxruntime', 'tensorrt' or 'openvino'")})


class CalibrationError(SchemaError):
    """A calibration config (file or dict) is malformed, of another version, or inconsistent."""


def _required_keys(entry: Dict[str, Any], qtype: str) -> list:
    bits = entry.get(layer_key(qtype, "bits"))
    if bits is None or not is_integer_bits(bits):
        return []
    fields = ("scale", "zero_point", "scheme", "dtype", "axis") if qtype == "weight" else \
        ("tracked_min", "tracked_max", "scheme", "dtype")
    return [layer_key(qtype, f) for f in fields]


def validate_calibration_config(config: Any) -> CalibrationConfig:
    """Check a calibration dict (keyed by module name) and return it; raise CalibrationError."""
    if not isinstance(config, dict):
        raise CalibrationError(f"calibration config must be a dict keyed by module name, got {type(config).__name__}")
    _validate_placement(config)
    for name, entry in layer_entries(config).items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise CalibrationError(f"calibration entry {short_repr(name)} must map a module name to a dict")
        _validate_entry(short_repr(name), entry)
    return config


def _validate_entry(name: str, entry: Dict[str, Any]) -> None:
    where = f"calibration entry {name}"
    for key, value in entry.items():
        if key not in _FIELDS:
            raise CalibrationError(f"{where}: unknown key {short_repr(key)}")
        try:
            Schema(_FIELDS[key]).validate(value)
        except SchemaError as exc:
            raise CalibrationError(f"{where}: {key} = {short_repr(value)} {exc.code.splitlines()[0]}") from None
    if not any(layer_key(q, "bits") in entry for q in QUANT_TYPES):
        raise CalibrationError(f"{where} has no weight_bits, input_bits or output_bits")
    for qtype in QUANT_TYPES:
        missing = [k for k in _required_keys(entry, qtype) if k not in entry]
        if missing:
            raise CalibrationError(f"{where} is missing {', '.join(missing)} "
                                   f"(required for {entry[layer_key(qtype, 'bits')]}-bit {qtype})")
        scheme_key = layer_key(qtype, "scheme")
        _check_grid(where, entry.get(layer_key(qtype, "bits")), entry.get(scheme_key), scheme_key, qtype)
        if qtype != "weight":
            _check_range(where, entry, layer_key(qtype, "tracked_min"), layer_key(qtype, "tracked_max"))
    if "weight_scale" in entry:
        _check_weight(where, entry)


def _check_grid(where: str, bits: Any, scheme: Any, key: str, qtype: str) -> None:
    """Activations are per tensor; a symmetric grid needs at least 2 bits."""
    if scheme is None:
        return
    if qtype != "weight" and is_per_channel(scheme):
        raise CalibrationError(f"{where}: {key} = {scheme!r}, but activations are quantized per tensor "
                               "(per_tensor_symmetric or per_tensor_affine)")
    if bits == 1 and is_symmetric(scheme):
        raise CalibrationError(f"{where}: 1-bit {qtype} with {key} = {scheme!r}; a symmetric grid needs at least "
                               "2 bits (use an affine scheme)")


def _check_range(where: str, entry: Dict[str, Any], min_key: str, max_key: str) -> None:
    lo, hi = entry.get(min_key), entry.get(max_key)
    if lo is not None and hi is not None and lo > hi:
        raise CalibrationError(f"{where}: {min_key} {lo} > {max_key} {hi}")


def _check_weight(where: str, entry: Dict[str, Any]) -> None:
    scales, zps, scheme = entry["weight_scale"], entry["weight_zero_point"], entry["weight_scheme"]
    if len(scales) != len(zps):
        raise CalibrationError(f"{where}: {len(scales)} weight scales but {len(zps)} zero points")
    if not is_per_channel(scheme) and len(scales) != 1:
        raise CalibrationError(f"{where}: per-tensor weight scheme with {len(scales)} scales")
    if is_per_channel(scheme) and entry.get("weight_axis") is None:
        raise CalibrationError(f"{where}: {scheme} weights need weight_axis, the output-channel axis of the weight "
                               "(0; 1 for ConvTranspose)")
    qmin, qmax = quant_range(entry["weight_bits"], entry["weight_dtype"], is_symmetric(scheme))
    bad = next((z for z in zps if not qmin <= z <= qmax), None)
    if bad is not None:
        raise CalibrationError(f"{where}: weight_zero_point {bad} is outside the {entry['weight_bits']}-bit "
                               f"{entry['weight_dtype']} grid [{qmin}, {qmax}]")


def layer_entries(config: CalibrationConfig) -> CalibrationConfig:
    """The per-layer entries of a calibration config (without the reserved placement entries)."""
    return {name: entry for name, entry in config.items() if name not in RESERVED_KEYS}


def _validate_placement(config: Dict[str, Any]) -> None:
    tensors, placement = config.get(TENSORS_KEY), config.get(PLACEMENT_KEY)
    if (tensors is None) != (placement is None):
        raise CalibrationError(f"calibration config has {TENSORS_KEY!r} or {PLACEMENT_KEY!r} without the other; "
                               "export it again with quantizer.export_model")
    if tensors is None:
        return
    try:
        _PLACEMENT_FIELDS.validate(placement)
    except SchemaError as exc:
        raise CalibrationError(f"calibration {PLACEMENT_KEY}: {exc.code.splitlines()[0]}") from None
    if not isinstance(tensors, dict):
        raise CalibrationError(f"calibration {TENSORS_KEY} must map tensor keys to ranges")
    for key, entry in tensors.items():
        where = f"calibration tensor {short_repr(key)}"
        if not isinstance(key, str):
            raise CalibrationError(f"{where}: tensor keys must be strings")
        try:
            _TENSOR_FIELDS.validate(entry)
        except SchemaError as exc:
            raise CalibrationError(f"{where}: {exc.code.splitlines()[0]}") from None
        _check_grid(where, entry["bits"], entry["scheme"], "scheme", "tensor")
        _check_range(where, entry, "tracked_min", "tracked_max")


def save_calibration_config(config: CalibrationConfig, path: str) -> None:
    """Validate and write ``config`` as versioned JSON, atomically (temp file + rename)."""
    validate_calibration_config(config)
    document: Dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": layer_entries(config)}
    if TENSORS_KEY in config:
        document.update(tensors=config[TENSORS_KEY], placement=config[PLACEMENT_KEY])
    atomic_write(path, json.dumps(document, indent=1, sort_keys=True) + "\n")


def load_calibration_config(path: str) -> CalibrationConfig:
    """Read and validate a calibration JSON written by :func:`save_calibration_config`."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise CalibrationError(f"{path} has {size} bytes, more than a calibration file can have "
                               f"({MAX_FILE_BYTES} bytes); pass the calibration JSON written by quantizer.export_model")
    try:
        with open(path, "rb") as fh:
            document = json.loads(fh.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CalibrationError(f"{path} is not a calibration JSON file ({reason}); "
                               "calibration files are written by quantizer.export_model") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CalibrationError(f"{path} is not a mixq calibration file (missing \"format\": \"{FORMAT_NAME}\")")
    version = document.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CalibrationError(f"{path} has calibration format version {short_repr(version)}; this mixq reads versions "
                               f"{list(READABLE_VERSIONS)}: re-export it with this version's quantizer.export_model")
    layers = document.get("layers")
    if not isinstance(layers, dict) or any(k in RESERVED_KEYS for k in layers):
        raise CalibrationError(f"{path}: \"layers\" must map module names to entries")
    config = dict(layers)
    if "tensors" in document or "placement" in document:
        config[TENSORS_KEY], config[PLACEMENT_KEY] = document.get("tensors"), document.get("placement")
    return validate_calibration_config(config)


__all__ = ["CalibrationConfig", "CalibrationError", "load_calibration_config", "save_calibration_config",
           "validate_calibration_config", "layer_entries", "layer_key", "FORMAT_VERSION", "TENSORS_KEY",
           "PLACEMENT_KEY"]
