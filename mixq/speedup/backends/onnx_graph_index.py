"""A read/write index over an ONNX graph for the backend rewrites: producers, readers, constants."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper


def node_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def default_opset(model: onnx.ModelProto) -> int:
    """The ``ai.onnx`` opset the model imports (0 if none)."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


class GraphIndex:
    """Producer and readers of every tensor and the initializers of ``model`` (indexed once;
    constants added through :meth:`add_const` are indexed too)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)

    def const(self, name: str) -> Optional[np.ndarray]:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def add_const(self, name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def only_reader(self, name: str, op_type: str) -> Optional[onnx.NodeProto]:
        """The single reader of tensor ``name`` if it is an ``op_type`` node and ``name`` is not a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) == 1 and readers[0].op_type == op_type and name not in self.outputs:
            return readers[0]
        return None
