"""One traced view of a model: which modules ran, in what order, on which tensors.

A single eval-mode, no-grad forward of an example input with a forward hook on each module of
interest records every call in execution order. Tensor identity links the calls (a BatchNorm
whose input *is* a conv's output follows that conv), so no assumption is made about module
order, ``nn.Sequential`` nesting or functional code in ``forward``. Conv -> BN pairs
(:mod:`.bn_fold`), reconstruction units (:mod:`mixq.quantizers.blocks`) and layer costs
(:mod:`mixq.search.auto_precision`) all read this view.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch
import torch.nn as nn

from .model_io import eval_forward


@dataclass(frozen=True)
class ModuleCall:
    """One call of a traced module: its first positional input and its output (kept alive for
    the trace's lifetime, so the ids of distinct tensors never collide)."""

    name: str
    module: nn.Module
    input: Optional[torch.Tensor]
    output: Any

    @property
    def input_id(self) -> int:
        return id(self.input)

    @property
    def output_id(self) -> int:
        return id(self.output)

    @property
    def output_tensor(self) -> Optional[torch.Tensor]:
        """The output, or the first tensor of a tuple/list output."""
        if torch.is_tensor(self.output):
            return self.output
        if isinstance(self.output, (tuple, list)) and self.output and torch.is_tensor(self.output[0]):
            return self.output[0]
        return None


def trace_modules(model: nn.Module, example_input: Any, modules: Mapping[str, nn.Module]) -> List[ModuleCall]:
    """Every call of ``modules`` (name -> submodule of ``model``) during one eval-mode forward
    of ``example_input`` (a tensor, a tuple of positional inputs or a dict of keyword inputs),
    in execution order; a module called twice appears twice. ``model``'s mode is restored."""
    calls: List[ModuleCall] = []

    def hook(name: str):
        def record(module: nn.Module, args, output) -> None:
            first = args[0] if args and torch.is_tensor(args[0]) else None
            calls.append(ModuleCall(name, module, first, output))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        eval_forward(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return calls
