"""The tracked ranges of a quantizer's activation points, as buffers of the wrapped model.

Registered on the model itself (``mixq_point_<i>_min`` / ``_max``, numbered in placement order:
no submodule, so an ``nn.Sequential`` runs as before), they follow ``.to(device)`` and
round-trip through ``state_dict()`` / ``load_state_dict()``: a QAT checkpoint keeps its ranges.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn

PREFIX = "mixq_point_"
Range = Tuple[torch.Tensor, torch.Tensor]


class PointRanges:
    """``ranges[key]`` -> ``(min, max)`` buffers of ``model`` (NaN until observed); assignable."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        self.model = model
        self.index: Dict[str, int] = {key: i for i, key in enumerate(keys)}
        remove_point_buffers(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for i in range(len(keys)):
            for side in ("min", "max"):
                model.register_buffer(f"{PREFIX}{i}_{side}", torch.tensor(float("nan"), device=device))

    def __getitem__(self, key: str) -> Range:
        i = self.index[key]
        return getattr(self.model, f"{PREFIX}{i}_min"), getattr(self.model, f"{PREFIX}{i}_max")

    def __setitem__(self, key: str, value: Range) -> None:
        lo, hi = self[key]
        with torch.no_grad():
            lo.copy_(torch.as_tensor(value[0]).detach().reshape(()))
            hi.copy_(torch.as_tensor(value[1]).detach().reshape(()))

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def keys(self):
        return self.index.keys()


def remove_point_buffers(model: nn.Module) -> None:
    """Drop a quantizer's point buffers from ``model`` (a float copy of a quantized model)."""
    for name in [n for n in model._buffers if n.startswith(PREFIX)]:
        delattr(model, name)
