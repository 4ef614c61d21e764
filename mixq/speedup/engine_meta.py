"""``meta.json`` of a saved engine: every field's type and range, checked before anything is used.

An engine file comes from disk and may be crafted or damaged, so nothing in its metadata is
trusted: sizes and batch sizes are bounded, shapes are lists of positive ints, report rows
and the layer map have the keys and types readers use, and the calibration passes
:func:`~mixq.compressor.calibration.validate_calibration_config`. A mistake is an
:class:`~mixq.speedup.backends.base.EngineFormatError` naming the file, the field and the fix.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from ..compressor.calibration import CalibrationError, validate_calibration_config
from ..messages import short_repr
from .backends import available_backends
from .backends.base import EngineFormatError

FORMAT_NAME = "mixq-engine"
FORMAT_VERSION = 2  # 2: meta.json records payload_size
MAX_PAYLOAD_BYTES = 4 * 2 ** 30
MAX_BATCHSIZE = 2 ** 20
MAX_RANK = 8
MAX_DIM = 2 ** 31 - 1
REPORT_KINDS = ("layer", "op", "summary")
REBUILD = "rebuild the engine with compress() and export it again"


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and 1 <= len(value) <= MAX_RANK and all(_is_int(d, 1, MAX_DIM) for d in value)


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (str, int, float, bool)


def _is_row(row: Any) -> bool:
    """A precision-report row: the string keys readers use, known optional keys typed, other keys scalars."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("layer", "requested", "actual")):
        return False
    share, macs = row.get("integer_mac_share", 0.0), row.get("macs", 0)
    return (row.get("kind", "layer") in REPORT_KINDS and isinstance(row.get("reason", ""), str)
            and isinstance(row.get("op", ""), str) and type(share) in (int, float) and 0 <= share <= 1
            and type(macs) in (int, float) and macs >= 0 and all(_is_scalar(v) for v in row.values()))


def _is_io(io: Any) -> bool:
    """The engine's structured inputs/outputs (:class:`~mixq.speedup.engine_io.EngineIO`)."""
    def spec(i: Any) -> bool:
        return (isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("dtype"), str)
                and isinstance(i.get("shape"), list) and len(i["shape"]) < MAX_RANK
                and all(_is_int(d, 1, MAX_DIM) for d in i["shape"]))
    return (isinstance(io, dict) and isinstance(io.get("inputs"), list) and len(io["inputs"]) > 0
            and all(spec(i) for i in io["inputs"]) and type(io.get("keyword_inputs", False)) is bool
            and _is_str_list(io.get("output_names")) and _is_str_list(io.get("output_keys", [])))


_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "backend": (lambda v: v in available_backends(), f"one of {available_backends()}"),
    "backend_version": (lambda v: isinstance(v, str), "a version string"),
    "mixq_version": (lambda v: isinstance(v, str), "a version string"),
    "payload_size": (lambda v: _is_int(v, 0, MAX_PAYLOAD_BYTES), f"an int in 0..{MAX_PAYLOAD_BYTES} (bytes)"),
    "input_names": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of strings"),
    "output_names": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of strings"),
    "input_shapes": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_shape(s) for s in v),
                     f"a list of shapes (lists of 1..{MAX_RANK} positive ints)"),
    "io": (_is_io, "a dict of 'inputs' (name, dtype, shape), 'keyword_inputs', 'output_names', 'output_keys'"),
    "batchsize": (lambda v: _is_int(v, 1, MAX_BATCHSIZE), f"an int in 1..{MAX_BATCHSIZE}"),
    "layer_nodes": (lambda v: isinstance(v, dict) and all(_is_str_list(n) for n in v.values()),
                    "a dict of layer name -> list of node names"),
    "precision_report": (lambda v: isinstance(v, list) and all(_is_row(r) for r in v),
                         "a list of rows with string 'layer', 'requested', 'actual' and 'reason'"),
    "calibration": (lambda v: isinstance(v, dict), "a calibration config (dict)"),
}
REQUIRED = ("backend", "backend_version", "payload_size", "input_names", "output_names", "input_shapes", "batchsize")


def validate_meta(meta: Any, path: str) -> Dict[str, Any]:
    """Check a parsed ``meta.json`` of the engine file ``path``; return it."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise EngineFormatError(f"{path} is not a mixq engine file (its meta.json lacks \"format\": \"{FORMAT_NAME}\")")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise EngineFormatError(f"{path} has engine format version {short_repr(version)}; this mixq reads version "
                                f"{FORMAT_VERSION}: {REBUILD}")
    for key in REQUIRED:
        if key not in meta:
            raise EngineFormatError(f"{path}: meta.json lacks {key!r}; {REBUILD}")
    for key, (check, expected) in _CHECKS.items():
        if key in meta and not check(meta[key]):
            raise EngineFormatError(f"{path}: meta.json field {key!r} = {short_repr(meta[key])} must be {expected}; "
                                    f"the file is damaged or was not written by mixq: {REBUILD}")
    counts = {len(meta["input_names"]), len(meta["input_shapes"])} | ({len(meta["io"]["inputs"])} if "io" in meta else set())
    if len(counts) > 1:
        raise EngineFormatError(f"{path}: meta.json's input names, shapes and io disagree on the number of inputs "
                                f"({sorted(counts)}); {REBUILD}")
    try:
        validate_calibration_config(meta.get("calibration") or {})
    except CalibrationError as exc:
        raise EngineFormatError(f"{path}: meta.json's calibration is invalid ({exc}); {REBUILD}") from None
    return meta
