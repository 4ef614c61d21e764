"""The state of a quantizer's activation points, as buffers of the wrapped model: per point its
tracked range and its two switches.

Registered on the model itself (``mixq_point_<i>_min`` / ``_max`` / ``_switches``, numbered in
placement order: no submodule, so an ``nn.Sequential`` runs as before), they follow
``.to(device)`` and round-trip through ``state_dict()`` / ``load_state_dict()``: a QAT
checkpoint keeps its ranges and switches. The switches (observer, fake quant: as a wrapper's,
see :class:`~mixq.compressor.wrapper.QuantizerModuleWrapper`) are mirrored in plain bools that
the forward reads; :meth:`PointState.reload_switches` refreshes them after a load.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

PREFIX = "mixq_point_"
BUFFERS_PER_POINT = 3
Range = Tuple[torch.Tensor, torch.Tensor]


class PointState:
    """``state[key]`` -> ``(min, max)`` buffers of ``model`` (NaN until observed), assignable;
    :meth:`observing` / :meth:`fake_quantizing` and their setters per point."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        self.model = model
        self.index: Dict[str, int] = {key: i for i, key in enumerate(keys)}
        remove_point_buffers(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for i in range(len(keys)):
            for side in ("min", "max"):
                model.register_buffer(f"{PREFIX}{i}_{side}", torch.tensor(float("nan"), device=device))
            model.register_buffer(f"{PREFIX}{i}_switches", torch.tensor([True, True], device=device))
        self._switches: List[List[bool]] = [[True, True] for _ in keys]

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

    def observing(self, key: str) -> bool:
        """Whether the quantizer updates this point's range."""
        return self._switches[self.index[key]][0]

    def fake_quantizing(self, key: str) -> bool:
        """Whether this point's tensor is fake-quantized."""
        return self._switches[self.index[key]][1]

    def set_switches(self, key: str, observer: Optional[bool] = None, fake_quant: Optional[bool] = None) -> None:
        """Set this point's switches (None leaves one as it is)."""
        i = self.index[key]
        for j, value in enumerate((observer, fake_quant)):
            if value is not None:
                self._switches[i][j] = bool(value)
        getattr(self.model, f"{PREFIX}{i}_switches").copy_(torch.tensor(self._switches[i]))

    def reload_switches(self) -> None:
        """Refresh the plain bools from the buffers (after ``load_state_dict``)."""
        for i in range(len(self._switches)):
            self._switches[i] = [bool(v) for v in getattr(self.model, f"{PREFIX}{i}_switches").tolist()]


def remove_point_buffers(model: nn.Module) -> None:
    """Drop a quantizer's point buffers from ``model`` (a float copy of a quantized model)."""
    for name in [n for n in model._buffers if n.startswith(PREFIX)]:
        delattr(model, name)
