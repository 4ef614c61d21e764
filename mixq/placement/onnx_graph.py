"""A read-only index of an ONNX graph: producers, readers, constants, float tensors, shapes."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def bypass(model: onnx.ModelProto, removed: Sequence[onnx.NodeProto], rename: Dict[str, str]) -> None:
    """Remove ``removed`` nodes and let every reader of ``rename``'s keys read their values instead
    (in place; ``rename`` maps a removed node's output to what replaces it)."""
    gone = {id(n) for n in removed}
    keep = [n for n in model.graph.node if id(n) not in gone]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop the initializers no node and no graph output reads (in place)."""
    used = {i for n in model.graph.node for i in n.input}
    used.update(o.name for o in model.graph.output)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _with_input_shapes(model: onnx.ModelProto, shapes: Dict[str, Sequence[int]]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shapes:
            for dim, value in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = int(value)
    return fixed


class OnnxGraph:
    """Index of ``model``'s main graph, built once (the model must not change afterwards)."""

    def __init__(self, model: onnx.ModelProto, input_shapes: Optional[Dict[str, Sequence[int]]] = None) -> None:
        """``input_shapes`` (concrete, e.g. batch 1) let shape inference resolve every dimension."""
        graph = model.graph
        self.model = model
        self.nodes: List[onnx.NodeProto] = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.order = {n.name: i for i, n in enumerate(self.nodes)}
        self.initializers = {i.name: i for i in graph.initializer}
        self.constants: Dict[str, onnx.TensorProto] = dict(self.initializers)
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = a.t
        self.producer: Dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in dict.fromkeys(n.input):
                if name:
                    self.consumers[name].append(n)
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = {o.name for o in graph.output}
        inferred = onnx.shape_inference.infer_shapes(_with_input_shapes(model, input_shapes) if input_shapes else model,
                                                     data_prop=bool(input_shapes))
        self.types: Dict[str, int] = {}
        self.shapes: Dict[str, List[Optional[int]]] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for name, t in self.initializers.items():
            self.types[name] = t.data_type
            self.shapes[name] = list(t.dims)

    def constant(self, name: str) -> Optional[np.ndarray]:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def is_activation(self, name: str) -> bool:
        """A float tensor computed at run time (not a weight or constant)."""
        return bool(name) and name not in self.constants and self.types.get(name) == onnx.TensorProto.FLOAT

    def activation_inputs(self, node: onnx.NodeProto) -> List[str]:
        return [i for i in dict.fromkeys(node.input) if self.is_activation(i)]

    def data_nodes(self, names: Sequence[str]) -> List[str]:
        """The nodes among ``names`` that compute on float activations (not shape helpers)."""
        return [n for n in names if self.activation_inputs(self.by_name[n])]

    def readers(self, tensor: str) -> List[onnx.NodeProto]:
        return self.consumers.get(tensor, [])

    def clip_bounds(self, node: onnx.NodeProto) -> Tuple[Optional[float], Optional[float]]:
        """Lower and upper bound of a Clip (None where absent or not constant)."""
        bounds: List[Optional[float]] = [None, None]
        for i, name in enumerate(node.input[1:3]):
            value = self.constant(name) if name else None
            bounds[i] = None if value is None else float(value)
        for a in node.attribute:  # opset < 11
            if a.name in ("min", "max"):
                bounds[0 if a.name == "min" else 1] = a.f
        return bounds[0], bounds[1]

    def weight_initializer(self, node: onnx.NodeProto) -> Optional[onnx.TensorProto]:
        """The stored weight of a Conv/Gemm/MatMul node (its second input), if it is one."""
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            return None
        return self.initializers.get(node.input[1])

    def macs(self, node: onnx.NodeProto) -> int:
        """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul for one sample (0 if unknown)."""
        out = self.shapes.get(node.output[0]) if node.output else None
        if not out or any(d is None for d in out[1:]):
            return 0
        per_sample = int(np.prod([d for d in out[1:]], dtype=np.int64)) if len(out) > 1 else 1
        if node.op_type in ("Conv", "ConvTranspose"):
            w = self.shapes.get(node.input[1])
            if not w or any(d is None for d in w):
                return 0
            kernel = int(np.prod(w[2:], dtype=np.int64))
            if node.op_type == "Conv":
                return per_sample * int(w[1]) * kernel
            in_shape = self.shapes.get(node.input[0])
            spatial = int(np.prod([d for d in (in_shape or [])[2:]], dtype=np.int64)) if in_shape else 0
            return spatial * int(w[0]) * int(w[1]) * kernel
        a = self.shapes.get(node.input[0])
        if not a or a[-1] is None:
            return 0
        k = a[-1]
        if node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            if k is None:
                return 0
        return per_sample * int(k)
