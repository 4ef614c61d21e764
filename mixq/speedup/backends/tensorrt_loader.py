"""Loading the ``tensorrt`` package (a missing or broken install becomes a clear
:class:`~.base.BackendUnavailable`) and the one process-wide TensorRT logger."""
from __future__ import annotations

import collections
import logging
from typing import Any, Optional

import torch

from .base import BackendUnavailable

logger = logging.getLogger("mixq.speedup.backends.tensorrt")

MIN_TENSORRT_MAJOR = 10
_INSTALL_HINT = 'pip install mixq[tensorrt] (from a source checkout: pip install -e ".[tensorrt]")'


def major(version: str) -> int:
    """The major version number (0 when unparsable)."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def load_tensorrt() -> Any:
    """``import tensorrt``; a missing or broken install becomes BackendUnavailable naming the fix."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            raise BackendUnavailable(
                f"the TensorRT backend needs the 'tensorrt' package (TensorRT {MIN_TENSORRT_MAJOR} or newer), "
                f"which is not installed: {_INSTALL_HINT}") from exc
        raise BackendUnavailable(
            f"the 'tensorrt' package is installed but its dependency {exc.name!r} is missing: reinstall it "
            f"with pip install --force-reinstall 'mixq[tensorrt]'") from exc
    except (ImportError, OSError, RuntimeError) as exc:  # e.g. libnvinfer missing, CUDA driver too old
        raise BackendUnavailable(
            f"the 'tensorrt' package is installed but cannot be loaded ({type(exc).__name__}: {exc}); its "
            "libraries must match this machine's CUDA driver: reinstall with pip install --force-reinstall "
            "'mixq[tensorrt]' (or the tensorrt-cu12 / tensorrt-cu13 wheel matching `nvidia-smi`)") from exc
    version = getattr(trt, "__version__", "unknown")
    if major(version) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {version} is too old: mixq builds strongly typed networks with the "
            f"TensorRT {MIN_TENSORRT_MAJOR}+ API: pip install -U 'mixq[tensorrt]'")
    return trt


def import_tensorrt(device: Optional[torch.device] = None) -> Any:
    """``tensorrt``, checked usable with buffers on ``device`` (default: a CUDA device)."""
    trt = load_tensorrt()
    if (device is None or device.type == "cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            "TensorRT needs an NVIDIA GPU and a CUDA build of PyTorch "
            "(torch.cuda.is_available() is False); backend='onnxruntime' runs on CPU")
    return trt


def installed_version() -> Optional[str]:
    """The installed TensorRT version, or None when it is absent or broken (no GPU needed)."""
    try:
        return str(load_tensorrt().__version__)
    except BackendUnavailable:
        return None


_TRT_LOGGER = None


def trt_logger(trt: Any) -> Any:
    """One process-wide ``trt.ILogger`` forwarding to :mod:`logging` and keeping recent errors.

    TensorRT keeps the first logger it is given for the whole process, so one instance is
    shared by every builder and runtime and lives as long as the module.
    """
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        severity = trt.ILogger.Severity
        levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
                  severity.WARNING: logging.WARNING, severity.INFO: logging.INFO,
                  severity.VERBOSE: logging.DEBUG}

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: collections.deque = collections.deque(maxlen=20)

            def log(self, sev: Any, msg: str) -> None:
                level = levels.get(sev, logging.INFO)
                if level >= logging.ERROR:
                    self.errors.append(msg)
                if logger.isEnabledFor(level):
                    logger.log(level, "TensorRT: %s", msg)

        _TRT_LOGGER = _Logger()
    return _TRT_LOGGER


def recent_errors(log: Any) -> str:
    """The errors TensorRT logged lately, for exception messages."""
    return "; ".join(log.errors) if log.errors else "no error was logged"
