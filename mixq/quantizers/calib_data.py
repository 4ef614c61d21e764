"""Calibration data as one tensor, from a tensor or any iterable of batches."""
from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def calibration_tensor(calib_data: Any, num_samples: int) -> torch.Tensor:
    """The first ``num_samples`` inputs of a tensor or of an iterable of batches (``x`` or ``(x, ...)``)."""
    if torch.is_tensor(calib_data):
        data = calib_data[:num_samples]
    else:
        parts, count = [], 0
        for batch in calib_data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not torch.is_tensor(x):
                raise TypeError("calib_data must be a tensor of inputs or an iterable of batches (x or (x, y)); "
                                f"got batches of {type(x).__name__}")
            parts.append(x)
            count += len(x)
            if count >= num_samples:
                break
        data = torch.cat(parts)[:num_samples] if parts else torch.empty(0)
    if not len(data):
        raise ValueError("calib_data is empty: give at least one calibration input")
    if len(data) < num_samples:
        logger.warning("calibration uses %d samples (num_samples=%d asked for more than calib_data holds)",
                       len(data), num_samples)
    return data
