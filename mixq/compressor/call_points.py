"""Addressing tensors inside a model's forward by where they are computed, and acting on them.

A *point key* names one tensor of one forward pass, independently of any exporter:

* ``"layer1.0.relu@1"``          the output of the second call of module ``layer1.0.relu``;
* ``"conv1@0:in0"``              the first input of the first call of ``conv1``;
* ``"layer1.0@0/add_#0"``        the output of the first ``add_`` (``out += identity``) made
  directly in the forward of ``layer1.0`` (not inside one of its children);
* ``"act@0/silu#0.sigmoid"``     the ``sigmoid(x)`` inside a SiLU (see :data:`DECOMPOSITIONS`;
                                 ``hardsigmoid(x)`` inside a HardSwish alike);
* ``"@input0"``                  the model's first positional input; ``""`` is the root scope.

Leaf modules (no children) are atomic: the calls inside them are not addressed, only their
inputs and outputs, so a quantizer's own arithmetic inside a wrapped layer never shifts a
counter. :class:`CallPoints` installs the hooks and a ``TorchFunctionMode`` that count calls
during every forward of the root model and hand each addressed tensor to a callback, which
may replace it (fake quantization) or just look at it (calibration, tracing).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .model_io import eval_forward
from .wrapped import is_wrapper

PointKey = str
# Called with (key, tensor); returns the tensor to use from then on (the same one to only look).
PointCallback = Callable[[PointKey, torch.Tensor], torch.Tensor]

INPUT_PREFIX = "@input"
_PART = re.compile(r"(@\d+|#\d+)\.[A-Za-z_]+$")  # 'act@0.sigmoid', 'self@0/scaled_dot_product_attention#0.query'
_MODULE_KEY = re.compile(r"^(?P<name>[^@]*)@(?P<call>\d+)(?::in(?P<index>\d+))?$")

# Functions whose exported graph holds intermediate tensors torch never materialises: each is
# recomputed from its parts, ``part(name, tensor)`` handing every part to the points (which may
# replace it), in the exporters' own arithmetic so that the parts match the graph's tensors.
Part = Callable[[str, torch.Tensor], torch.Tensor]


def _silu(part: Part, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return x * part("sigmoid", torch.sigmoid(x))


def _hardswish(part: Part, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return x * part("hardsigmoid", torch.nn.functional.hardsigmoid(x))


def _sdpa(part: Part, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
          enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, scaled as the ONNX exporter does (q and k by sqrt(scale))."""
    root = (scale if scale is not None else 1.0 / float(query.shape[-1]) ** 0.5) ** 0.5
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = part("scores", part("query", query * root) @ part("key", (key.transpose(-2, -1) * root)))
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, -1)
    probs = part("probs", torch.nan_to_num(probs, nan=0.0))  # a fully masked row: zeros, as exported
    if dropout_p:
        probs = torch.dropout(probs, dropout_p, True)
    return probs @ value


DECOMPOSITIONS: Dict[str, Callable[..., torch.Tensor]] = {"silu": _silu, "hardswish": _hardswish,
                                                          "scaled_dot_product_attention": _sdpa}
_DECOMPOSED_MODULES = {nn.SiLU: "silu", nn.Hardswish: "hardswish"}


def module_key(name: str, call: int) -> PointKey:
    """Key of the output of call ``call`` of module ``name``."""
    return f"{name}@{call}"


def input_key(name: str, call: int, index: int) -> PointKey:
    """Key of input ``index`` of call ``call`` of module ``name``."""
    return f"{name}@{call}:in{index}"


def model_input_key(index) -> PointKey:
    """Key of the model's positional input ``index`` (an int) or keyword input (a name)."""
    return f"{INPUT_PREFIX}{index}" if isinstance(index, int) else f"{INPUT_PREFIX}:{index}"


def key_module(key: PointKey) -> Optional[Tuple[str, int, Optional[int]]]:
    """``(module, call, input index or None)`` when ``key`` addresses a module's output or
    input, else None (function calls, model inputs)."""
    match = None if key.startswith(INPUT_PREFIX) or "/" in key else _MODULE_KEY.match(key)
    if match is None:
        return None
    index = match.group("index")
    return match.group("name"), int(match.group("call")), None if index is None else int(index)


@dataclass
class _Frame:
    name: str
    call: int
    atomic: bool
    counters: Dict[str, int] = field(default_factory=dict)
    saved_input: Optional[torch.Tensor] = None  # a decomposed module's input, kept before it runs

    @property
    def scope(self) -> str:
        return module_key(self.name, self.call)


def _decomposition_of(module: nn.Module) -> Optional[Callable[..., torch.Tensor]]:
    return next((DECOMPOSITIONS[n] for t, n in _DECOMPOSED_MODULES.items() if isinstance(module, t)), None)


def _is_float_tensor(x: Any) -> bool:
    return torch.is_tensor(x) and x.is_floating_point()


class _Mode(TorchFunctionMode):
    def __init__(self, owner: "CallPoints") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        frame = owner.frames[-1] if owner.frames else None
        if frame is None or frame.atomic or owner.busy:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", None)
        decomposed = DECOMPOSITIONS.get(name) if name else None
        if decomposed is not None and args and _is_float_tensor(args[0]):  # in-place ones run out of place
            index = frame.counters.get(name, 0)
            base = f"{frame.scope}/{name}#{index}"
            if owner.wants_parts(base) or owner.recording:
                frame.counters[name] = index + 1
                out = owner.decomposed(base, decomposed, args, kwargs)
                return owner.emit(base, out, in_place=False)
        out = func(*args, **kwargs)
        if not name or not _is_float_tensor(out):
            return out
        index = frame.counters.get(name, 0)
        frame.counters[name] = index + 1
        return owner.emit(f"{frame.scope}/{name}#{index}", out, in_place=name.endswith("_") and not name.startswith("_"))


class CallPoints:
    """Counts module and function calls during each forward of ``model`` and passes the
    addressed tensors to ``callback``.

    ``keys`` limits the callback to those keys (None: every addressable tensor, for tracing).
    Remove the hooks with :meth:`remove`.
    """

    def __init__(self, model: nn.Module, callback: PointCallback, keys: Optional[Set[PointKey]] = None,
                 skip: Sequence[nn.Module] = ()) -> None:
        self.model = model
        self.callback = callback
        self.keys = None if keys is None else set(keys)
        self.recording = keys is None
        self._part_bases = {k.rpartition(".")[0] for k in self.keys or () if _PART.search(k)}
        self.frames: List[_Frame] = []
        self.calls: Dict[str, int] = {}
        self.busy = 0  # > 0 while our own callbacks run: their ops are not counted
        self._mode: Optional[_Mode] = None
        self._handles: list = []
        self._install(skip)

    # -- bookkeeping ---------------------------------------------------------------------------
    def wants(self, key: PointKey) -> bool:
        return self.keys is None or key in self.keys

    def wants_parts(self, base: PointKey) -> bool:
        """Whether a part of the decomposed op at ``base`` is wanted (keys ``base.<part>``)."""
        return base in self._part_bases

    def emit(self, key: PointKey, tensor: torch.Tensor, in_place: bool) -> torch.Tensor:
        if not self.wants(key) or not _is_float_tensor(tensor):
            return tensor
        self.busy += 1
        try:
            out = self.callback(key, tensor)
            if in_place and out is not tensor:
                with torch.no_grad():
                    tensor.copy_(out.detach())  # callers may ignore an in-place op's result
            return out
        finally:
            self.busy -= 1

    def decomposed(self, base: str, fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        """``fn`` recomputed from its parts, each part handed to the points as ``base.<part>``."""
        kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        return fn(lambda part, tensor: self.emit(f"{base}.{part}", tensor, in_place=False), *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "CallPoints":
        return self  # copies of the model share it; mixq's own copies strip its hooks (strip_hooks)

    def _hook(self, fn: Callable) -> Callable:
        def hook(*args):
            return fn(*args)
        hook._mixq_hook = True
        return hook

    def _install(self, skip: Sequence[nn.Module]) -> None:
        skipped = {id(m) for m in skip}
        inner = {id(m.module) for m in self.model.modules() if is_wrapper(m)}
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._hook(self._root_pre), with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._hook(self._root_post), always_call=True))
        for name, module in root.named_modules():
            if not name or id(module) in inner or id(module) in skipped:
                continue
            atomic = is_wrapper(module) or not any(True for _ in module.children())
            self._handles.append(module.register_forward_pre_hook(self._hook(self._pre(name, module, atomic)),
                                                                  with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._hook(self._post(name, module)), always_call=True))

    def _root_pre(self, _module, args, kwargs):
        if self.frames:  # the root called inside itself: nothing to reset
            return None
        self.calls = {}
        self.frames.append(_Frame("", 0, False))
        self._mode = _Mode(self)
        self._mode.__enter__()
        new_args = tuple(self.emit(model_input_key(i), a, in_place=False) if _is_float_tensor(a) else a
                         for i, a in enumerate(args))
        new_kwargs = {k: self.emit(model_input_key(k), v, in_place=False) if _is_float_tensor(v) else v
                      for k, v in kwargs.items()}
        return new_args, new_kwargs

    def _root_post(self, _module, _args, output):
        if len(self.frames) != 1:
            return None
        self.frames.pop()
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
        return None

    def _pre(self, name: str, module: nn.Module, atomic: bool):
        decomposed = _decomposition_of(module)

        def hook(_module, args, kwargs):
            if not self.frames:
                return None
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            frame = _Frame(name, call, atomic)
            self.frames.append(frame)
            if decomposed is not None and args and _is_float_tensor(args[0]) and (
                    self.recording or self.wants_parts(frame.scope)):
                frame.saved_input = args[0].clone()  # an in-place activation overwrites its input
            if not any(self.wants(input_key(name, call, i)) for i in range(len(args))):
                return None
            new_args = tuple(self.emit(input_key(name, call, i), a, in_place=False) if _is_float_tensor(a) else a
                             for i, a in enumerate(args))
            return new_args, kwargs
        return hook

    def _post(self, name: str, module: nn.Module):
        def hook(_module, args, output):
            if len(self.frames) < 2 or self.frames[-1].name != name:
                return None
            frame = self.frames.pop()
            key = frame.scope
            if frame.saved_input is not None:
                self.busy += 1
                try:
                    output = self.decomposed(key, _decomposition_of(module), (frame.saved_input,), {})
                finally:
                    self.busy -= 1
            if _is_float_tensor(output):
                return self.emit(key, output, in_place=False)
            if isinstance(output, tuple) and any(_is_float_tensor(o) for o in output):
                return tuple(self.emit(f"{key}#{i}", o, in_place=False) if _is_float_tensor(o) else o
                             for i, o in enumerate(output))
            return output
        return hook

    def remove(self) -> None:
        """Remove every hook (a forward in progress is not affected)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def strip_hooks(model: nn.Module) -> None:
    """Remove every hook mixq put on ``model`` and its modules (on a copy of a quantized model)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook_id, hook in list(hooks.items()):
                if getattr(hook, "_mixq_hook", False):
                    del hooks[hook_id]
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_always_called.pop(hook_id, None)


def trace_points(model: nn.Module, inputs: Any) -> Dict[PointKey, torch.Tensor]:
    """Every addressable float tensor of one eval-mode forward of ``model`` on ``inputs`` (see
    :class:`~.model_io.ModelInputs`), by key, in execution order (copies: later in-place ops do
    not change them)."""
    records: Dict[PointKey, torch.Tensor] = {}

    def record(key: PointKey, tensor: torch.Tensor) -> torch.Tensor:
        records[key] = tensor.detach().clone()
        return tensor

    points = CallPoints(model, record)
    try:
        eval_forward(model, inputs)
    finally:
        points.remove()
    return records


__all__ = ["CallPoints", "PointKey", "trace_points", "strip_hooks", "module_key", "input_key", "model_input_key", "key_module",
           "DECOMPOSITIONS"]
