"""A model's inputs and outputs as structures: a tensor, a tuple of tensors, or keyword tensors
in; a tensor, a tuple/list, a dict, a ``ModelOutput`` or a dataclass of tensors out.

Exported graphs and engines see flat lists; these classes keep the structure so that a model is
called, exported and answered exactly as its own code expects (token ids and attention masks of
any integer dtype, Hugging Face ``ModelOutput`` returns).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters live (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _call_with(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def check_dummy_input(model: nn.Module, dummy_input: Any) -> None:
    """Run ``model`` once on ``dummy_input`` (eval mode, no grad, every module's mode restored)
    and raise ValueError naming the problem when it does not fit, before anything is wrapped."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            _call_with(model, dummy_input)
    except Exception as exc:  # whatever the model raises on the wrong input
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"dummy_input does not fit the model ({reason[:300]}); pass one batch of the inputs the "
                         "model's forward takes (a tensor, a tuple or a dict of tensors)") from None
    finally:
        for module, training in modes:
            module.training = training


def eval_forward(model: nn.Module, inputs: Any) -> Any:
    """One eval-mode, no-grad forward of ``model`` on ``inputs`` (anything :meth:`ModelInputs.of`
    takes); ``model``'s training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return ModelInputs.of(inputs).call(model)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class ModelInputs:
    """Positional and keyword tensors of one model call (keywords in the forward's order)."""

    args: Tuple[torch.Tensor, ...] = ()
    kwargs: Dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any, model: Optional[nn.Module] = None) -> "ModelInputs":
        """From a tensor, a tuple/list of tensors or a dict of tensors (``ModelInputs`` passes)."""
        if isinstance(value, ModelInputs):
            return value
        if torch.is_tensor(value):
            return cls((value,))
        if isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
            return cls(tuple(value))
        if isinstance(value, dict) and value and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
            return cls((), _in_signature_order(dict(value), model))
        raise TypeError(f"model inputs must be a tensor, a tuple/list of tensors or a dict of named tensors, "
                        f"got {type(value).__name__}")

    def call(self, model: Callable) -> Any:
        return model(*self.args, **self.kwargs)

    def tensors(self) -> List[torch.Tensor]:
        """Flat, in graph-input order: positional first, then keywords."""
        return list(self.args) + list(self.kwargs.values())

    def names(self) -> List[str]:
        """Graph input names: ``input`` / ``input_<i>`` for positional tensors, the keyword names."""
        positional = ["input"] if len(self.args) == 1 else [f"input_{i}" for i in range(len(self.args))]
        return positional + list(self.kwargs)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ModelInputs":
        return ModelInputs(tuple(fn(t) for t in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    def numpy_feeds(self) -> Dict[str, np.ndarray]:
        """Graph input name -> array (detached, on the CPU), as ONNX Runtime takes them."""
        return {n: t.detach().cpu().numpy() for n, t in zip(self.names(), self.tensors())}

    def first(self, n: int) -> "ModelInputs":
        """The first ``n`` samples (batch axis 0)."""
        return self.map(lambda t: t[:n])

    def from_flat(self, tensors: Sequence[torch.Tensor]) -> "ModelInputs":
        """The same structure holding ``tensors`` (in :meth:`tensors` order)."""
        k = len(self.args)
        return ModelInputs(tuple(tensors[:k]), dict(zip(self.kwargs, tensors[k:])))

    def export_args(self) -> tuple:
        """``args`` for ``torch.onnx.export``: keywords go in a trailing dict."""
        return self.args + ((self.kwargs,) if self.kwargs else ())

    def describe(self) -> str:
        parts = [f"{n}: {tuple(t.shape)} {t.dtype}" for n, t in zip(self.names(), self.tensors())]
        return ", ".join(parts)


def _in_signature_order(kwargs: Dict[str, torch.Tensor], model: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
    """Keywords in the order of ``model.forward``'s parameters (how exporters number inputs)."""
    if model is None:
        return kwargs
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    order = {name: i for i, name in enumerate(params)}
    return dict(sorted(kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))


@dataclass(frozen=True)
class OutputStructure:
    """How a model's output nests its tensors, to rebuild it from a flat list."""

    kind: str                        # 'tensor' | 'sequence' | 'mapping' | 'dataclass'
    cls: Any = None
    keys: Tuple[str, ...] = ()
    count: int = 1

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Any:
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "sequence":
            return self.cls(tensors) if self.cls in (tuple, list) else tuple(tensors)
        values = dict(zip(self.keys, tensors))
        if self.kind == "dataclass" or (self.cls is not dict and _is_model_output(self.cls)):
            return self.cls(**values)
        return self.cls(values) if self.cls is not dict else values


def _is_model_output(cls: Any) -> bool:
    return hasattr(cls, "to_tuple") and dataclasses.is_dataclass(cls)


def flatten_output(output: Any) -> Tuple[List[torch.Tensor], OutputStructure]:
    """The tensors of a model output (None entries of a mapping skipped, as exporters do) and
    its structure."""
    if torch.is_tensor(output):
        return [output], OutputStructure("tensor")
    if isinstance(output, (tuple, list)) and output and all(torch.is_tensor(o) for o in output):
        return list(output), OutputStructure("sequence", type(output), count=len(output))
    if isinstance(output, dict):
        items = [(k, v) for k, v in output.items() if v is not None]
        if items and all(isinstance(k, str) and torch.is_tensor(v) for k, v in items):
            return [v for _, v in items], OutputStructure("mapping", type(output), tuple(k for k, _ in items),
                                                          len(items))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)
                 if getattr(output, f.name) is not None]
        if items and all(torch.is_tensor(v) for _, v in items):
            return [v for _, v in items], OutputStructure("dataclass", type(output), tuple(k for k, _ in items),
                                                          len(items))
    raise TypeError(f"the model returns {type(output).__name__}; speedup needs a tensor, a tuple/list of tensors, "
                    "or a dict / ModelOutput / dataclass of tensors")


def output_names(structure: OutputStructure) -> List[str]:
    """Graph output names: the keys of a mapping, else ``output`` / ``output_<i>``."""
    if structure.keys:
        return list(structure.keys)
    return ["output"] if structure.count == 1 else [f"output_{i}" for i in range(structure.count)]
