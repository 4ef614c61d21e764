"""The tracked ranges of a quantizer's activation points, as buffers of the wrapped model.

Attached to the model as ``mixq_points``, they follow ``.to(device)`` and round-trip through
``state_dict()`` / ``load_state_dict()`` (a QAT checkpoint keeps its ranges); buffers are numbered
in placement order, the point keys kept beside them.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn

ATTRIBUTE = "mixq_points"
Range = Tuple[torch.Tensor, torch.Tensor]


class PointRanges(nn.Module):
    """``ranges[key]`` -> ``(min, max)`` (NaN until observed); ``ranges[key] = (min, max)``."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__()
        self.index: Dict[str, int] = {key: i for i, key in enumerate(keys)}
        for i in range(len(keys)):
            self.register_buffer(f"min_{i}", torch.tensor(float("nan")))
            self.register_buffer(f"max_{i}", torch.tensor(float("nan")))

    def __getitem__(self, key: str) -> Range:
        i = self.index[key]
        return getattr(self, f"min_{i}"), getattr(self, f"max_{i}")

    def __setitem__(self, key: str, value: Range) -> None:
        i = self.index[key]
        lo, hi = value
        with torch.no_grad():
            getattr(self, f"min_{i}").copy_(torch.as_tensor(lo).detach().reshape(()))
            getattr(self, f"max_{i}").copy_(torch.as_tensor(hi).detach().reshape(()))

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def keys(self):
        return self.index.keys()

    def forward(self) -> None:  # holds state only
        return None
