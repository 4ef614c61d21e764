"""Find the ONNX tensors of a calibration's placed points (point key -> tensor) in an export."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..compressor.call_points import PointKey, key_module, trace_points
from ..compressor.model_io import ModelInputs
from .module_map import ModuleCall
from .matching import _close, find_tensor, onnx_tensor_values, probe_copy, probe_inputs
from .onnx_graph import OnnxGraph


@dataclass
class LocatedPoints:
    """Where each point key sits in the graph: a tensor, or (for a layer's input) the edges into
    the layer's nodes; ``missing`` keys have no counterpart in this export."""

    tensors: Dict[PointKey, str] = field(default_factory=dict)
    edges: Dict[PointKey, List[Tuple[str, str]]] = field(default_factory=dict)
    missing: List[PointKey] = field(default_factory=list)


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same nodes computing the same-named tensors (constants may differ: an exporter shares
    equal ones, e.g. freshly zeroed biases, under one name)."""
    def nodes(m: onnx.ModelProto) -> list:
        return [(n.name, n.op_type, list(n.output)) for n in m.graph.node if n.op_type != "Constant"]
    return nodes(a) == nodes(b)


def locate_points(model: onnx.ModelProto, calls: Mapping[str, List[ModuleCall]], torch_model: nn.Module,
                  example_inputs: Any, keys: Iterable[PointKey],
                  export: Callable[[nn.Module], onnx.ModelProto],
                  hints: Optional[Mapping[PointKey, str]] = None) -> LocatedPoints:
    """Map ``keys`` onto ``model`` (the fp32 export of ``torch_model``) by value on one sample.

    Values come from a probe copy of the model (:func:`.matching.probe_copy`, well-conditioned
    BatchNorms) exported by ``export`` the same way, when that export has the same graph; else
    from ``model`` itself."""
    g = OnnxGraph(model)
    example = probe_inputs(ModelInputs.of(example_inputs, torch_model).first(1))
    wanted = list(dict.fromkeys(t for n in g.nodes for t in list(n.input) + list(n.output) if g.is_activation(t)))
    probe = probe_copy(torch_model)
    probe_model = export(probe)
    if not _same_graph(probe_model, model):
        probe, probe_model = torch_model.eval(), model
    with torch.no_grad():
        values = onnx_tensor_values(probe_model, example, wanted)
        records = trace_points(probe, example)
    found = LocatedPoints()
    for key in keys:
        parts = key_module(key)
        if parts is not None and parts[2] is not None:
            module, call, _ = parts
            edges = _input_edges(g, calls.get(module, []), call, records.get(key), values)
            if edges:
                found.edges[key] = edges
            else:
                found.missing.append(key)
        else:
            hint = (hints or {}).get(key)
            value = records[key].numpy() if key in records else None
            if value is not None and hint in values and values[hint].shape == value.shape and _close(values[hint], value):
                tensor = hint  # the tensor the quantizer placed, when this export has it (equal values elsewhere do not count)
            else:
                tensor = find_tensor(value, values, wanted) if value is not None else None
            if tensor is None:
                found.missing.append(key)
            else:
                found.tensors[key] = tensor
    return found


def _input_edges(g: OnnxGraph, calls: List[ModuleCall], call: int, value, values: Mapping[str, np.ndarray]
                 ) -> List[Tuple[str, str]]:
    if value is None or call >= len(calls):
        return []
    target = value.numpy()
    for tensor in calls[call].inputs:
        v = values.get(tensor)
        if v is not None and v.shape == target.shape and _close(v, target):
            nodes = set(calls[call].nodes)
            return [(tensor, r.name) for r in g.readers(tensor) if r.name in nodes]
    return []
