"""Reconstruction units: the pieces of a model whose outputs are reconstructed one at a time.

A unit is a sequence of modules applied one after the other to the unit's input. Found
automatically (:func:`find_units`) by running the model once:

* a residual block — a module (not a container) whose traced forward adds two computed
  tensors and that holds at least one conv/linear layer — is one unit;
* elsewhere a conv/linear layer forms a unit with the BatchNorm that consumes its output and
  the activation that consumes that, when they do (checked by tensor identity, so the
  grouping does not depend on how ``forward`` is written).

:func:`units_from_names` builds units from an explicit list instead.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from ..compressor.config import ConfigError, WEIGHT_TYPES
from ..compressor.module_trace import trace_modules
from ..compressor.wrapper import QuantizerModuleWrapper
from ..messages import close_matches, short_repr

logger = logging.getLogger(__name__)

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh,
               nn.Sigmoid, nn.Tanh, nn.Mish)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ADDS = {operator.add, operator.iadd, torch.add}
UnitSpec = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Unit:
    """Modules (by qualified name) applied in sequence; the unit's output is the last one's."""

    modules: Tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.modules)

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in self.modules:
            x = model.get_submodule(name)(x)
        return x


def _inner(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, QuantizerModuleWrapper) else module


class _WrapperLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizerModuleWrapper) or super().is_leaf_module(m, qualname)


def _adds_two_tensors(module: nn.Module) -> bool:
    try:
        graph = _WrapperLeafTracer().trace(module)
    except Exception as exc:  # any Python the tracer cannot follow: not treated as a block
        logger.debug("cannot trace %s (%s); looking inside it for units", type(module).__name__, exc)
        return False
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADDS) or \
                 (node.op == "call_method" and node.target in ("add", "add_"))
        if is_add and sum(isinstance(a, torch.fx.Node) for a in node.args[:2]) == 2:
            return True
    return False


def is_residual_block(module: nn.Module) -> bool:
    """A non-container module with a conv/linear inside whose forward adds two computed tensors."""
    if isinstance(module, _CONTAINERS + (QuantizerModuleWrapper,)):
        return False
    if not any(isinstance(_inner(m), WEIGHT_TYPES) for m in module.modules()):
        return False
    return _adds_two_tensors(module)


def _residual_blocks(model: nn.Module) -> List[str]:
    found: List[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_residual_block(child):
                found.append(name)
            elif not isinstance(child, QuantizerModuleWrapper):
                visit(name, child)

    visit("", model)
    return found


def find_units(model: nn.Module, example_input: Any) -> List[Unit]:
    """Units of ``model`` in execution order (one forward of ``example_input``)."""
    blocks = _residual_blocks(model)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, QuantizerModuleWrapper)]
    inside = tuple(n + "." for n in blocks + wrappers)
    leaves = {n: m for n, m in model.named_modules()
              if n and not n.startswith(inside) and (n in blocks or n in wrappers or not list(m.children()))}
    events = [(c.name, c.input_id, c.output_id) for c in trace_modules(model, example_input, leaves)]
    calls: Dict[str, int] = {}
    for name, _, _ in events:
        calls[name] = calls.get(name, 0) + 1
    shared = {n for n, c in calls.items() if c > 1}
    for name in sorted(shared):
        if isinstance(_inner(leaves[name]), WEIGHT_TYPES) or name in blocks:
            logger.warning("%s runs %d times per forward; it is not reconstructed (round to nearest)", name, calls[name])
    return _group(events, leaves, set(blocks), shared)


def _group(events: List[Tuple[str, int, int]], leaves: Dict[str, nn.Module], blocks: Set[str],
           shared: Set[str]) -> List[Unit]:
    units: List[Unit] = []
    chain: List[str] = []
    stage, chain_out = "", -1

    def flush() -> None:
        if chain:
            units.append(Unit(tuple(chain)))
            chain.clear()

    for name, in_id, out_id in events:
        module = _inner(leaves[name])
        joins_bn = isinstance(module, BATCHNORMS) and stage == "weight"
        joins_act = isinstance(module, ACTIVATIONS) and stage in ("weight", "bn")
        if name not in shared and chain and in_id == chain_out and (joins_bn or joins_act):
            chain.append(name)
            stage, chain_out = ("bn" if joins_bn else "act"), out_id
            continue
        flush()
        stage = ""
        if name in shared:
            continue
        if name in blocks:
            units.append(Unit((name,)))
        elif isinstance(module, WEIGHT_TYPES):
            chain.append(name)
            stage, chain_out = "weight", out_id
    flush()
    return units


def units_from_names(model: nn.Module, specs: Sequence[UnitSpec]) -> List[Unit]:
    """Units from names: a module name (run as one unit) or a list of names (run in sequence)."""
    names = [n for n, _ in model.named_modules() if n]
    units = []
    for index, spec in enumerate(specs):
        chain = (spec,) if isinstance(spec, str) else tuple(spec)
        if not chain:
            raise ConfigError(f"blocks[{index}] is empty; give a module name or a list of module names")
        for name in chain:
            if name not in names:
                raise ConfigError(f"blocks[{index}]: {short_repr(name)} is not a module of the model"
                                  f"{close_matches(name, names)}")
        units.append(Unit(chain))
    return units


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs."""


def capture(model: nn.Module, module_name: str, where: str, data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The input (``where='input'``) or output of ``module_name`` for every sample of ``data``,
    running ``model`` only as far as that module."""
    module = model.get_submodule(module_name)
    store: List[torch.Tensor] = []

    def keep(tensor: Optional[torch.Tensor]) -> None:
        if not torch.is_tensor(tensor):
            raise TypeError(f"{module_name} must take and return one tensor to be reconstructed; "
                            "pass blocks=[...] to group it with its neighbours")
        store.append(tensor.detach())
        raise _StopForward

    if where == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0] if args else None))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: keep(out))
    try:
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                try:
                    model(data[i:i + batch_size])
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(store) < -(-len(data) // batch_size):
        raise RuntimeError(f"{module_name} did not run in the model's forward; it cannot be reconstructed")
    return torch.cat(store)
