"""Torch -> fp32 ONNX with a dynamic batch axis, BatchNorm folded into its conv in torch first.

BatchNorm is folded on a deep copy of the model before export (the BN becomes ``nn.Identity``),
so no exporter-side fusion renames or merges nodes: every conv keeps its own node and the
module mapping stays exact. Which Conv -> BN pairs exist is found by running the model with
hooks that compare tensor identity (:func:`mixq.compressor.bn_fold.find_conv_bn_pairs`), so
no assumption about module order or forward code is made.

Two exporters are supported (``exporter=``): ``"torchscript"`` (the default) and ``"dynamo"``.
TorchScript is the default because it is about ten times faster to run (0.1 s against 1-4 s
on the models here), keeps operators that backends fuse well (``Flatten``,
``GlobalAveragePool``, ``Gemm``; the dynamo exporter writes ``ReduceMean`` + ``Reshape``) and
names every node after its module scope. Both are mapped back to module names by
:mod:`mixq.placement.module_map`. The dynamo exporter needs the ``onnxscript`` package
(``pip install mixq[dynamo]``); without it ``exporter='dynamo'`` fails naming that command.
Exporter deprecation notices and progress logs are silenced: the user cannot act on them. The
exporter's TracerWarnings are not: they say where a forward cannot be traced, and every export
is checked against the model (:mod:`.export_check`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Sequence

import onnx
import torch
import torch.nn as nn

from ..compressor.bn_fold import find_conv_bn_pairs
from ..compressor.layers import bn_factor, weight_axis
from .onnx_graph import bypass
from ..compressor.model_io import ModelInputs, OutputStructure, flatten_output
from ..compressor.model_io import output_names as io_output_names
from ..compressor.wrapper import set_submodule
from .export_check import verify_export

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
OPSET = {"torchscript": 17, "dynamo": 18}
BATCH_AXIS_NAME = "batch"
DYNAMO_INSTALL_HINT = 'pip install "mixq[dynamo]" (from a source checkout: pip install -e ".[dynamo]")'


@dataclass
class FoldedBatchNorm:
    """A BatchNorm folded into the conv before it: ``factor`` = gamma / sqrt(var + eps)."""

    conv: str
    bn: str
    factor: torch.Tensor
    axis: int


@dataclass
class ExportedModel:
    """An fp32 ONNX model and what the export did to the torch model."""

    model: onnx.ModelProto
    input_names: List[str]
    output_names: List[str]
    exporter: str
    folded: Dict[str, FoldedBatchNorm] = field(default_factory=dict)  # keyed by conv name
    output_structure: OutputStructure = OutputStructure("tensor")


def conv_bn_pairs(model: nn.Module, example_inputs: Any) -> Dict[str, str]:
    """``{conv_name: bn_name}`` for every BatchNorm fed directly by a conv of ``model``."""
    return find_conv_bn_pairs(model, ModelInputs.of(example_inputs))


def fold_batchnorms(model: nn.Module, pairs: Mapping[str, str]) -> Dict[str, FoldedBatchNorm]:
    """Fold each ``pairs[conv] = bn`` into the conv of ``model`` (in place) and replace the BN
    by ``nn.Identity``. Weights become ``w * factor`` per output channel, the bias
    ``(b - mean) * factor + beta``."""
    folded = {}
    with torch.no_grad():
        for conv_name, bn_name in pairs.items():
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            factor = bn_factor(bn).detach()
            axis = weight_axis(conv)
            shape = [1] * conv.weight.dim()
            shape[axis] = -1
            conv.weight.copy_(conv.weight * factor.reshape(shape))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            new_bias = (bias - bn.running_mean) * factor + beta
            conv.bias = nn.Parameter(new_bias.detach().clone(), requires_grad=False)
            set_submodule(model, bn_name, nn.Identity())
            folded[conv_name] = FoldedBatchNorm(conv_name, bn_name, factor.clone(), axis)
    return folded


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm as ``x * factor + shift`` per channel (axis 1).

    Unfolded BatchNorms that follow a conv are exported in this form, because both exporters
    would otherwise fuse them into the conv, merging a quantized tensor away.
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        factor = bn_factor(bn).detach()
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
        self.register_buffer("factor", factor.clone())
        self.register_buffer("shift", (beta - bn.running_mean * factor).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.factor.reshape(shape) + self.shift.reshape(shape)


@contextlib.contextmanager
def quiet_export() -> Iterator[List[str]]:
    """Silence exporter notices and progress logs the user cannot act on; collect, as the list
    this yields, the TracerWarnings that say where a forward cannot be traced (with the place)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    tracer: List[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield tracer
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            seen = set()
            for w in caught:
                if issubclass(w.category, torch.jit.TracerWarning):
                    text = f"{' '.join(str(w.message).split())} ({os.path.basename(w.filename)}:{w.lineno})"
                    if text not in seen:
                        seen.add(text)
                        tracer.append(text)


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """``nn.MultiheadAttention`` in eval mode without gradients takes a fused fast path
    (``aten::_native_multi_head_attention``) that the torchscript exporter cannot write; the
    regular path computes the same attention in exportable ops."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _positional_forward(model: nn.Module, inputs: ModelInputs) -> None:
    """Let the TorchScript exporter, which passes every input by position, call a forward with
    keyword-only parameters: they keep their defaults (what ``model(x)`` does); without a
    default, or given an input, they cannot be exported this way."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    keyword_only = [p for p in params if p.kind is p.KEYWORD_ONLY]
    if not keyword_only:
        return
    blocked = [p.name for p in keyword_only if p.default is p.empty or p.name in inputs.kwargs]
    if blocked:
        raise ValueError(f"{type(model).__name__}.forward takes keyword-only parameter(s) {blocked}, which the "
                         "TorchScript exporter can only pass by position: make them ordinary parameters "
                         "(forward(self, x, name=...)) or use exporter='dynamo'")
    forward = model.forward
    model.forward = lambda *args: forward(*args)


def _run_outputs(model: nn.Module, inputs: ModelInputs) -> OutputStructure:
    with torch.no_grad():
        return flatten_output(inputs.call(model))[1]


def _export_torchscript(model: nn.Module, inputs: ModelInputs, input_names: List[str],
                        output_names: List[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {name: {0: BATCH_AXIS_NAME} for name in input_names + output_names}
    torch.onnx.export(model, inputs.export_args(), buffer, input_names=input_names, output_names=output_names,
                      dynamic_axes=axes, opset_version=OPSET["torchscript"], do_constant_folding=True,
                      dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def check_exporter(exporter: str) -> None:
    """Raise ValueError for an unknown exporter, ModuleNotFoundError naming the install command
    when the dynamo exporter's ``onnxscript`` package is missing."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; use one of {list(EXPORTERS)}")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError(f"exporter='dynamo' needs the onnxscript package: {DYNAMO_INSTALL_HINT}; "
                                      "or use exporter='torchscript' (the default)", name="onnxscript") from None


def _export_dynamo(model: nn.Module, inputs: ModelInputs, input_names: List[str],
                   output_names: List[str]) -> onnx.ModelProto:
    batch = torch.export.Dim(BATCH_AXIS_NAME, min=1)
    shapes = {"args": tuple({0: batch} for _ in inputs.args)} if not inputs.kwargs else \
        {**{f"arg{i}": {0: batch} for i in range(len(inputs.args))}, **{k: {0: batch} for k in inputs.kwargs}}
    program = torch.onnx.export(model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True,
                                input_names=input_names, output_names=output_names,
                                dynamic_shapes=shapes["args"] if "args" in shapes else shapes,
                                opset_version=OPSET["dynamo"], verbose=False)
    return program.model_proto


def _drop_value_preserving_nodes(model: onnx.ModelProto) -> None:
    """Remove Identity nodes (the exporter routes some initializers through them), Casts to the
    type they read (``x.to(x.dtype)``, ``.float()`` of a float) and Concats of one tensor
    (``torch.cat([x])``, as DenseNet's first layer of each block does): they compute nothing, and
    a tensor copied by them would be quantized twice or in the wrong place (a Q/DQ pair must sit
    right before the op that fuses with it)."""
    graph = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(graph.input)}
    types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {o.name for o in graph.output}
    rename: Dict[str, str] = {}
    removed = []
    for node in graph.node:
        same_type = node.op_type == "Cast" and any(a.name == "to" and types.get(node.input[0]) == a.i
                                                   for a in node.attribute)
        single_concat = node.op_type == "Concat" and len(node.input) == 1
        if (node.op_type == "Identity" or same_type or single_concat) and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            removed.append(node)
    bypass(model, removed, rename)


def _split_hardswish(model: onnx.ModelProto) -> None:
    """Write each ``HardSwish(x)`` as ``x * HardSigmoid(x)`` (ONNX's own definition of it, the
    exporter's tensor in between): the gate is a tensor of its own that a backend can quantize
    on the fixed grid [0, 1] and compute in integer (ONNX Runtime's form: see
    :mod:`mixq.speedup.backends.ort_hardsigmoid`). ONNX Runtime runs HardSwish as these two
    ops anyway, so a float engine is unchanged; OpenVINO's int8 MobileNetV3 ran 1.6x slower with
    the split (its HSwish fusion needs the single op), so only backends that ask for it get it."""
    nodes = []
    for node in model.graph.node:
        if node.op_type != "HardSwish":
            nodes.append(node)
            continue
        gate = f"{node.output[0]}/hardsigmoid"
        split = [onnx.helper.make_node("HardSigmoid", [node.input[0]], [gate], f"{node.name}_HardSigmoid",
                                       alpha=1.0 / 6.0, beta=0.5),
                 onnx.helper.make_node("Mul", [node.input[0], gate], list(node.output), f"{node.name}_Mul")]
        for new in split:
            new.metadata_props.extend(node.metadata_props)
        nodes += split
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique, non-empty name (later passes key nodes by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)


def export_onnx(model: nn.Module, example_inputs: Any, fold: Mapping[str, str],
                exporter: str = DEFAULT_EXPORTER, keep: Sequence[str] = (), verify: bool = True,
                split_hardswish: bool = False) -> ExportedModel:
    """Export a float, eval-mode deep copy of ``model`` to ONNX with a dynamic batch axis on
    every input and output, after folding ``fold[conv] = bn`` pairs in torch. The BatchNorms
    named in ``keep`` stay separate nodes (see :class:`ChannelAffine`).

    ``example_inputs``: a tensor, a tuple of tensors or a dict of keyword tensors (any dtype:
    token ids stay integers), or :class:`~mixq.compressor.model_io.ModelInputs`. ``model`` itself
    is not modified. Inputs are named ``input`` / ``input_<i>`` (positional) or by keyword,
    outputs ``output`` / ``output_<i>`` or by the keys of a dict / ``ModelOutput`` return.

    The graph is compared with the model on two other batches (:mod:`.export_check`) and
    refused when they differ; ``verify=False`` skips that for a copy of a model whose export
    was just verified. ``split_hardswish`` writes HardSwish as ``x * HardSigmoid(x)`` (for a
    backend that quantizes the gate, :func:`_split_hardswish`).
    """
    check_exporter(exporter)
    clone = copy.deepcopy(model).cpu().eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    folded = fold_batchnorms(clone, fold)
    for bn_name in keep:
        set_submodule(clone, bn_name, ChannelAffine(clone.get_submodule(bn_name)))
    inputs = ModelInputs.of(example_inputs, model).map(lambda t: t.detach().cpu())
    input_names = inputs.names()
    structure = _run_outputs(clone, inputs)
    output_names = io_output_names(structure)
    if exporter == "torchscript":
        _positional_forward(clone, inputs)
    with quiet_export() as tracer_warnings, _mha_fastpath_off():
        try:
            if exporter == "torchscript":
                proto = _export_torchscript(clone, inputs, input_names, output_names)
            else:
                proto = _export_dynamo(clone, inputs, input_names, output_names)
        except Exception as exc:  # the exporter's own errors: name them in one line
            reason = " ".join(str(exc).split())[:400] or type(exc).__name__
            raise RuntimeError(f"the {exporter} exporter cannot export {type(model).__name__} ({reason})"
                               + ("; try exporter='dynamo'" if exporter == "torchscript" else "")) from None
    _drop_value_preserving_nodes(proto)
    if split_hardswish:
        _split_hardswish(proto)
    _ensure_node_names(proto)
    if verify:
        verify_export(proto, input_names, output_names,
                      lambda flat: flatten_output(inputs.from_flat(flat).call(clone))[0], inputs.tensors(),
                      tracer_warnings,
                      lambda flat: flatten_output(inputs.from_flat(flat).call(copy.deepcopy(clone).double()))[0])
    logger.info("exported %s with the %s exporter (%d nodes, %d BatchNorms folded)", type(model).__name__,
                exporter, len(proto.graph.node), len(folded))
    return ExportedModel(proto, input_names, output_names, exporter, folded, structure)
