"""The files ``export_model`` writes: float weights, calibration JSON, fp32 ONNX (each atomically)."""
from __future__ import annotations

import io
import logging
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..atomic_io import atomic_write
from .calibration import CalibrationConfig, save_calibration_config

logger = logging.getLogger(__name__)


def write_export(float_model: nn.Module, calibration: CalibrationConfig, model_path: Optional[str],
                 calibration_path: Optional[str], onnx_path: Optional[str], input_shape: Optional[Sequence[int]],
                 device: torch.device) -> None:
    """Write the files of :meth:`~mixq.compressor.quantizer.Quantizer.export_model` whose path is given."""
    if model_path is not None:
        _atomic_torch_save(float_model.state_dict(), model_path)
        logger.info("float weights saved to %s", model_path)
    if calibration_path is not None:
        save_calibration_config(calibration, calibration_path)
        logger.info("calibration config saved to %s", calibration_path)
    if onnx_path is not None:
        export_fp32_onnx(float_model, torch.randn(*input_shape, device=device), onnx_path)
        logger.info("fp32 ONNX saved to %s", onnx_path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def export_fp32_onnx(model: nn.Module, dummy_input: torch.Tensor, path: str) -> None:
    """Plain fp32 ONNX (TorchScript exporter, dynamic batch axis), written atomically."""
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(model, (dummy_input,), buffer, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
    finally:
        model.train(was_training)
    for w in caught:  # the exporter's notices are noise; a TracerWarning says the graph may be wrong
        if issubclass(w.category, torch.jit.TracerWarning):
            logger.warning("exporting %s: %s (%s:%d)", path, w.message, w.filename, w.lineno)
    atomic_write(path, buffer.getvalue())
