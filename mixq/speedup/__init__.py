"""Speedup: turn a calibration config into a real mixed-precision engine and measure it.

``ModelSpeedup`` (ONNX Runtime by default, ``backend='tensorrt'`` or ``'auto'``) and
``ModelSpeedupTensorRT`` export the float model to ONNX, annotate it with Q/DQ pairs and Casts
per layer (:mod:`.precision_plan`, :mod:`.onnx_qdq`), build a backend engine and report, per
layer, the precision that actually runs.
"""
from .backends import available_backends, get_backend
from .backends.base import BackendUnavailable, BuildOptions, EngineFormatError
from .model_speedup import ModelSpeedup, ModelSpeedupTensorRT
from ..placement.onnx_export import EXPORTERS

__all__ = ["ModelSpeedup", "ModelSpeedupTensorRT", "BackendUnavailable", "BuildOptions", "EngineFormatError",
           "EXPORTERS", "available_backends", "get_backend"]
