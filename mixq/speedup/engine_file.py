"""The saved-engine container: a zip holding ``meta.json`` and the backend's ``payload.bin``.

``meta.json`` records the mixq engine format and version, the backend and its version, the
I/O names and shapes, the layer -> node map, the precision report and the calibration config. Reading checks all of
it and raises :class:`EngineFormatError` naming the problem and the fix. Writing is atomic
(temporary file + rename). Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any, Dict, Optional, Tuple

from ..compressor.calibration import FORMAT_NAME as CALIBRATION_FORMAT
from .backends.base import EngineFormatError

FORMAT_NAME = "mixq-engine"
FORMAT_VERSION = 1
META = "meta.json"
PAYLOAD = "payload.bin"


def write_engine_file(path: str, meta: Dict[str, Any], payload: bytes) -> None:
    """Write ``meta`` (plus format name/version) and ``payload`` to ``path`` atomically."""
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mixq-engine-", suffix=".zip", dir=directory)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(META, json.dumps(document, indent=1, sort_keys=True))
            zf.writestr(PAYLOAD, payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_calibration_file(path: str) -> bool:
    """True when ``path`` holds a mixq calibration JSON (what users pass for an engine by mistake)."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and document.get("format") == CALIBRATION_FORMAT


def read_engine_file(path: str, backend: Optional[str] = None,
                     backend_version: Optional[str] = None) -> Tuple[Dict[str, Any], bytes]:
    """``(meta, payload)`` of an engine file; checks format, version and (if given) backend."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no engine file at {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if META not in names or PAYLOAD not in names:
                raise EngineFormatError(f"{path} is not a mixq engine file (missing {META} or {PAYLOAD}); "
                                        "engine files are written by export_quantized_model")
            meta = json.loads(zf.read(META).decode("utf-8"))
            payload = zf.read(PAYLOAD)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if _is_calibration_file(path):
            raise EngineFormatError(f"{path} is a mixq calibration file, not an engine: build an engine from it with "
                                    "ModelSpeedup(model, input_shape, config=<this file>).compress() and save it "
                                    "with export_quantized_model") from None
        raise EngineFormatError(f"{path} is not a readable mixq engine file ({exc}); it may be truncated or "
                                "corrupt: export it again with export_quantized_model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise EngineFormatError(f"{path} is not a mixq engine file (its meta.json lacks \"format\": \"{FORMAT_NAME}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EngineFormatError(f"{path} has engine format version {meta.get('format_version')!r}; this mixq reads "
                                f"version {FORMAT_VERSION}: rebuild the engine with compress() and export it again")
    for key in ("backend", "backend_version", "input_names", "output_names", "input_shapes"):
        if key not in meta:
            raise EngineFormatError(f"{path}: meta.json lacks {key!r}; export the engine again")
    if backend is not None and meta["backend"] != backend:
        raise EngineFormatError(f"{path} holds a {meta['backend']!r} engine, not a {backend!r} one: load it with "
                                f"backend={meta['backend']!r} (or rebuild it for {backend!r})")
    if backend_version is not None and meta["backend_version"] != backend_version:
        raise EngineFormatError(f"{path} was built with {meta['backend']} {meta['backend_version']}, this is "
                                f"{backend_version}: rebuild the engine with compress() and export it again")
    return meta, payload
