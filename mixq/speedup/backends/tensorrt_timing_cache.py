"""Where TensorRT's timing cache lives, and loading it into / saving it from a builder config.

TensorRT times every candidate kernel ("tactic") of every layer while building; the timing
cache (``ITimingCache``) keeps those measurements so the next build of a similar network skips
them (TensorRT "Optimizing Builder Performance: Timing Cache"). It is valid for one TensorRT
version and one device, so the file name carries both.

Location, first match wins:

1. ``BuildOptions.extra['timing_cache']``: a file path, or ``None``/``False``/``''`` for no cache;
2. the environment variable ``MIXQ_TENSORRT_TIMING_CACHE``: a file path ('' for no cache);
3. ``$MIXQ_CACHE_DIR/tensorrt/`` (default ``~/.cache/mixq/tensorrt/``), file
   ``timing-<tensorrt version>-<device name>.cache``.

A cache that TensorRT refuses (other version or device) is ignored with a warning and replaced
by the one this build writes.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from ...atomic_io import atomic_write

logger = logging.getLogger(__name__)

ENV_PATH = "MIXQ_TENSORRT_TIMING_CACHE"
ENV_DIR = "MIXQ_CACHE_DIR"
OPTION = "timing_cache"


def default_cache_dir() -> Path:
    root = os.environ.get(ENV_DIR)
    return (Path(root) if root else Path.home() / ".cache" / "mixq") / "tensorrt"


def timing_cache_path(extra: Mapping[str, Any], tensorrt_version: str, device_name: str) -> Optional[Path]:
    """The timing-cache file for this build, or None when caching is switched off."""
    if OPTION in extra:
        value = extra[OPTION]
        return Path(value) if value else None
    if ENV_PATH in os.environ:
        value = os.environ[ENV_PATH]
        return Path(value) if value else None
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{tensorrt_version}-{device_name}").strip("-")
    return default_cache_dir() / f"timing-{slug}.cache"


def attach_timing_cache(config: Any, path: Optional[Path]) -> Any:
    """Create the config's ``ITimingCache`` from ``path`` (empty when missing or unreadable) and
    set it on ``config``; returns the cache object."""
    data = b""
    if path is not None and path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.warning("cannot read the TensorRT timing cache %s (%s); starting an empty one", path, exc)
    try:
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):  # a corrupt file; TensorRT normally returns None
        cache = None
    if cache is None and data:
        logger.warning("TensorRT rejected the timing cache %s (another version or device?); starting an empty "
                       "one", path)
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        logger.warning("TensorRT did not accept the timing cache %s (another version or device?); building "
                       "without it", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    elif data:
        logger.info("TensorRT: using timing cache %s", path)
    return cache


def save_timing_cache(config: Any, path: Optional[Path]) -> None:
    """Write the config's timing cache (grown by the build) to ``path``; failures only warn."""
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is None:
        return
    try:
        atomic_write(path, bytes(memoryview(cache.serialize())))
    except OSError as exc:
        logger.warning("cannot write the TensorRT timing cache %s: %s", path, exc)
