"""What the TensorRT checks need to know about an ONNX graph: constants, element types, neighbours,
and which configured layer a node serves.

Constants are what TensorRT's ONNX parser can see through at import time: initializers,
``Constant`` node outputs, and ``Identity``/``Cast`` chains over them (onnx-tensorrt
``onnxOpImporters.cpp``, ``getWeightsFromIdentityOrConstant``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .onnx_graph_index import default_opset, node_attr  # noqa: F401  (re-exported for the TensorRT modules)

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_PASS_THROUGH = {"Identity", "Cast"}
_Q_DQ = {"QuantizeLinear", "DequantizeLinear"}
# nodes a Q/DQ or Cast is walked through to the layers around it: the rest of its own chain
_CHAIN = _Q_DQ | {"Cast", "Identity"}


def type_name(elem_type: Optional[int]) -> str:
    """``'FLOAT16'``, ``'INT32'``... for an ONNX element type (``'unknown'`` for None)."""
    return "unknown" if elem_type is None else TensorProto.DataType.Name(elem_type)


class GraphFacts:
    """Producers, readers, constants and element types of one ONNX graph (read-only index)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.opset = default_opset(model)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in dict.fromkeys(n.input):
                if name:
                    self.consumers[name].append(n)
        self.graph_inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.graph_outputs = list(graph.output)
        self._constants: Dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                value = node_attr(n, "value", None)
                if isinstance(value, TensorProto):
                    self._constants[n.output[0]] = value
        self.types = self._element_types(model)
        self._rooted = set(self._constants)
        for n in self.nodes:  # ONNX nodes are topologically sorted
            if n.op_type != "Constant" and any(n.input) and all(i in self._rooted for i in n.input if i):
                self._rooted.update(o for o in n.output if o)

    def _element_types(self, model: onnx.ModelProto) -> Dict[str, int]:
        types: Dict[str, int] = {name: t.data_type for name, t in self._constants.items()}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # an invalid graph: the checker reports it; use what the graph declares
            inferred = model
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        return types

    # -- constants ------------------------------------------------------------------------------
    def constant_root(self, name: str) -> Optional[str]:
        """The initializer/``Constant`` output ``name`` reduces to through Identity/Cast nodes."""
        seen = 0
        while name not in self._constants:
            node = self.producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH or seen > 16:
                return None
            name, seen = node.input[0], seen + 1
        return name

    def constant(self, name: str) -> Optional[np.ndarray]:
        """The value of a constant tensor (through Identity/Cast), else None."""
        root = self.constant_root(name) if name else None
        return None if root is None else numpy_helper.to_array(self._constants[root])

    def is_constant(self, name: str) -> bool:
        """A build-time constant: computed from initializers/``Constant`` outputs only (e.g. float
        weights through their own QuantizeLinear), which TensorRT folds; "rooted at an
        IConstantLayer" in NvInfer.h's words."""
        return bool(name) and name in self._rooted

    def elem_type(self, name: str) -> Optional[int]:
        return self.types.get(name)

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        """Static shape of a constant, else None."""
        value = self.constant(name)
        return None if value is None else tuple(value.shape)


class LayerLocator:
    """Which configured layers (``{layer: [node names]}``, the plan's map) a node serves.

    A compute node belongs to its layer. A Q/DQ pair or Cast inserted between layers serves the
    layer whose output it quantizes (walking up) and the layers whose input it is (walking
    down), through its own chain only (Q, DQ, Cast, and the Clip of a narrow grid between a DQ
    and a Q): a grid carried past an unconfigured op is attributed to the reader.
    """

    def __init__(self, facts: GraphFacts, layer_nodes: Optional[Dict[str, Sequence[str]]]) -> None:
        self.facts = facts
        self.node_layers: Dict[str, List[str]] = defaultdict(list)
        for layer, nodes in (layer_nodes or {}).items():
            for node in nodes:
                self.node_layers[node].append(layer)
        self.known = bool(layer_nodes)

    def roles(self, node: onnx.NodeProto) -> List[Tuple[str, str]]:
        """``[(layer, role)]`` with role ``'node'`` (its own), ``'output'`` or ``'input'``."""
        own = self.node_layers.get(node.name)
        if own:
            return [(layer, "node") for layer in own]
        found: List[Tuple[str, str]] = []
        for layer in self._walk(node, upstream=True):
            found.append((layer, "output"))
        for layer in self._walk(node, upstream=False):
            found.append((layer, "input"))
        return list(dict.fromkeys(found))

    def _walk(self, start: onnx.NodeProto, upstream: bool, limit: int = 12) -> List[str]:
        layers: List[str] = []
        frontier, seen = [start], {start.name}
        for _ in range(limit):
            nxt = []
            for node in frontier:
                for neighbour in self._neighbours(node, upstream):
                    if neighbour.name in seen:
                        continue
                    seen.add(neighbour.name)
                    own = self.node_layers.get(neighbour.name)
                    if own:
                        layers.extend(own)
                    elif self._in_chain(neighbour):
                        nxt.append(neighbour)
            if not nxt:
                break
            frontier = nxt
        return list(dict.fromkeys(layers))

    def _in_chain(self, node: onnx.NodeProto) -> bool:
        if node.op_type in _CHAIN:
            return True
        if node.op_type != "Clip":
            return False
        source = self.facts.producer.get(node.input[0])
        readers = self.facts.consumers.get(node.output[0], [])
        return (source is not None and source.op_type == "DequantizeLinear" and bool(readers)
                and all(r.op_type == "QuantizeLinear" for r in readers))

    def _neighbours(self, node: onnx.NodeProto, upstream: bool) -> Iterable[onnx.NodeProto]:
        if upstream:
            for name in node.input[:1] if node.op_type in _Q_DQ | {"Clip"} else node.input:
                producer = self.facts.producer.get(name)
                if producer is not None and not self.facts.is_constant(name):
                    yield producer
        else:
            for name in node.output:
                yield from self.facts.consumers.get(name, [])
