"""Inference backends behind one interface (:mod:`.base`), imported only when asked for.

``get_backend('onnxruntime' | 'tensorrt' | 'openvino' | 'auto')``; ``'auto'`` picks TensorRT when the
``tensorrt`` package imports and a CUDA device exists, else OpenVINO when it is installed, else
ONNX Runtime, and logs its choice.
"""
from __future__ import annotations

import importlib
import logging
from typing import Dict, List, Tuple

from ...placement.op_rules import auto_backend
from .base import Backend, BackendUnavailable, BuildOptions, Engine, EngineFormatError

_REGISTRY: Dict[str, Tuple[str, str]] = {
    "onnxruntime": (".onnxruntime", "OnnxRuntimeBackend"),
    "tensorrt": (".tensorrt", "TensorRTBackend"),
    "openvino": (".openvino", "OpenVinoBackend"),
}
AUTO = "auto"
logger = logging.getLogger(__name__)


def available_backends() -> List[str]:
    """Names accepted by :func:`get_backend` (besides ``'auto'``)."""
    return list(_REGISTRY)


def resolve_backend_name(name: str) -> str:
    """The concrete backend ``name`` stands for (resolves ``'auto'``); unknown names are an error."""
    if name == AUTO:
        chosen = auto_backend()
        logger.info("backend='auto' chose %s (TensorRT on an NVIDIA GPU, else OpenVINO when installed, "
                    "else ONNX Runtime)", chosen)
        return chosen
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {available_backends() + [AUTO]}")
    return name


def get_backend(name: str) -> Backend:
    """A backend instance by name, importing its module now."""
    module_name, class_name = _REGISTRY[resolve_backend_name(name)]
    module = importlib.import_module(module_name, __name__)
    return getattr(module, class_name)()


__all__ = ["Backend", "BackendUnavailable", "BuildOptions", "Engine", "EngineFormatError", "available_backends",
           "get_backend", "resolve_backend_name"]
