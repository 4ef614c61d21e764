"""The saved-engine container: a zip holding ``meta.json`` and the backend's ``payload.bin``.

``meta.json`` records the mixq engine format and version, the backend and its version, the
payload's size, the I/O names and shapes, the layer -> node map, the precision report and the
calibration config (:mod:`.engine_meta` checks every field). Reading refuses, before
inflating anything, a member larger than its limit or than the size ``meta.json`` records,
and inflates in bounded chunks, so a small crafted file cannot exhaust memory: reading takes
at most twice the payload's declared size. Every problem is an :class:`EngineFormatError`
naming the file and the fix. Writing is atomic (:mod:`mixq.atomic_io`). Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any, Dict, Optional, Tuple

from ..atomic_io import atomic_output
from ..compressor.calibration import FORMAT_NAME as CALIBRATION_FORMAT
from ..compressor.calibration import MAX_FILE_BYTES as MAX_CALIBRATION_BYTES
from .backends.base import EngineFormatError
from .engine_meta import FORMAT_NAME, FORMAT_VERSION, MAX_PAYLOAD_BYTES, REBUILD, validate_meta

META = "meta.json"
PAYLOAD = "payload.bin"
MAX_META_BYTES = 32 * 2 ** 20
MAX_MEMBERS = 16
_CHUNK = 2 ** 20
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
               ValueError)


def write_engine_file(path: str, meta: Dict[str, Any], payload: bytes) -> None:
    """Write ``meta`` (plus format name/version and payload size) and ``payload`` to ``path`` atomically."""
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta, "payload_size": len(payload)}
    text = json.dumps(document, indent=1, sort_keys=True)
    with atomic_output(path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(META, text)
        zf.writestr(PAYLOAD, payload)


def _is_calibration_file(path: str) -> bool:
    """True when ``path`` holds a mixq calibration JSON (what users pass for an engine by mistake)."""
    try:
        if os.path.getsize(path) > MAX_CALIBRATION_BYTES:
            return False
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("format") == CALIBRATION_FORMAT


def _not_an_engine(path: str, reason: str) -> EngineFormatError:
    if _is_calibration_file(path):
        return EngineFormatError(f"{path} is a mixq calibration file, not an engine: build an engine from it with "
                                 "ModelSpeedup(model, input_shape, config=<this file>).compress() and save it "
                                 "with export_quantized_model")
    return EngineFormatError(f"{path} is not a readable mixq engine file ({reason}); it may be truncated or "
                             "corrupt: export it again with export_quantized_model")


def _member_count(path: str) -> Optional[int]:
    """Entries the zip's end record declares (before the central directory is read), if found."""
    with open(path, "rb") as fh:
        end = zipfile._EndRecData(fh)  # what ZipFile itself reads first
    return None if end is None else end[zipfile._ECD_ENTRIES_TOTAL]


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, inflated in bounded chunks into one buffer of its declared size."""
    size = info.file_size
    buffer = bytearray(size)
    view = memoryview(buffer)
    with zf.open(info) as fh:
        done = 0
        while done < size:
            chunk = fh.read(min(_CHUNK, size - done))
            if not chunk:
                raise EOFError(f"{info.filename} ends after {done} of its {size} bytes")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        if fh.read(1):  # also completes the CRC check
            raise zipfile.BadZipFile(f"{info.filename} holds more than its declared {size} bytes")
    view.release()
    return bytes(buffer)


def _parse_meta(path: str, data: bytes) -> Dict[str, Any]:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_an_engine(path, f"{META}: {exc}") from None
    except RecursionError:
        raise EngineFormatError(f"{path}: {META} is nested too deeply to be mixq metadata; {REBUILD}") from None


def read_engine_file(path: str, backend: Optional[str] = None,
                     backend_version: Optional[str] = None) -> Tuple[Dict[str, Any], bytes]:
    """``(meta, payload)`` of an engine file; checks format, version, every meta field and
    (if given) the backend and its version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no engine file at {path}")
    try:
        count = _member_count(path)
        if count is not None and count > MAX_MEMBERS:
            raise EngineFormatError(f"{path} is a zip of {count} entries, not a mixq engine file ({META} and "
                                    f"{PAYLOAD}); export the engine with export_quantized_model")
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if META not in infos or PAYLOAD not in infos:
                raise EngineFormatError(f"{path} is not a mixq engine file (missing {META} or {PAYLOAD}); "
                                        "engine files are written by export_quantized_model")
            if infos[META].file_size > MAX_META_BYTES:
                raise EngineFormatError(f"{path}: {META} inflates to {infos[META].file_size} bytes, more than mixq "
                                        f"metadata can have ({MAX_META_BYTES}); the file is damaged or crafted")
            meta = validate_meta(_parse_meta(path, _read_member(zf, infos[META])), path)
            declared = infos[PAYLOAD].file_size
            if declared != meta["payload_size"]:
                raise EngineFormatError(f"{path}: {PAYLOAD} inflates to {declared} bytes but meta.json records "
                                        f"{meta['payload_size']}; the file is damaged or crafted: {REBUILD}")
            if backend is not None and meta["backend"] != backend:
                raise EngineFormatError(f"{path} holds a {meta['backend']!r} engine, not a {backend!r} one: load it "
                                        f"with backend={meta['backend']!r} (or rebuild it for {backend!r})")
            if backend_version is not None and meta["backend_version"] != backend_version:
                raise EngineFormatError(f"{path} was built with {meta['backend']} {meta['backend_version']}, this is "
                                        f"{backend_version}: {REBUILD}")
            payload = _read_member(zf, infos[PAYLOAD])
    except EngineFormatError:
        raise
    except MemoryError:
        raise EngineFormatError(f"{path}: not enough memory to read its payload; free memory and retry") from None
    except PermissionError:
        raise
    except (*_ZIP_ERRORS, OSError) as exc:
        raise _not_an_engine(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return meta, payload
