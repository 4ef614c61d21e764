"""Hand-built QDQ-annotated ONNX graphs for the backend unit tests, and ways to run them.

Graphs follow the annotation contract of :mod:`mixq.speedup.onnx_qdq`: activations are
QuantizeLinear/DequantizeLinear pairs with int8 zero points, weights are int8 initializers read
by a per-channel DequantizeLinear, biases are int32 with scale ``input_scale * weight_scale``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

OPSET = 17


class QDQGraph:
    """Add nodes one by one; :meth:`build` returns the checked model."""

    def __init__(self, input_shape: Sequence[Optional[int]]) -> None:
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"] + list(input_shape[1:]))
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        name = self._name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: Optional[str] = None, **attrs) -> str:
        name = name or self._name(op)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def qdq(self, tensor: str, scale: float, zero_point: int) -> str:
        """Q -> DQ of an activation on an int8 grid (zero point ``zero_point``)."""
        scale_name, zp_name = self.const(np.float32(scale), "scale"), self.const(np.int8(zero_point), "zp")
        q = self.node("QuantizeLinear", [tensor, scale_name, zp_name])
        return self.node("DequantizeLinear", [q, scale_name, zp_name])

    def weight(self, codes: np.ndarray, scales: np.ndarray, axis: int = 0) -> str:
        """DQ of int8 weight codes with per-channel scales and zero points 0."""
        return self.node("DequantizeLinear", [self.const(codes.astype(np.int8), "w"),
                                              self.const(scales.astype(np.float32), "w_scale"),
                                              self.const(np.zeros(len(scales), np.int8), "w_zp")], axis=axis)

    def bias(self, codes: np.ndarray, scales: np.ndarray) -> str:
        """DQ of int32 bias codes (scale input_scale * weight_scale, zero point 0)."""
        return self.node("DequantizeLinear", [self.const(codes.astype(np.int32), "b"),
                                              self.const(scales.astype(np.float32), "b_scale"),
                                              self.const(np.zeros(len(scales), np.int32), "b_zp")], axis=0)

    def build(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "qdq", [self.input], [], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        inferred = {vi.name: vi for vi in shape_inference.infer_shapes(model).graph.value_info}
        model.graph.output.extend(inferred[o] for o in outputs)
        onnx.checker.check_model(model)
        return model


def random_conv(rng: np.random.Generator, cout: int, cin: int, k: int, in_scale: float) -> Tuple[np.ndarray, ...]:
    """Int8 weight codes, their per-channel scales, int32 bias codes and the bias scales."""
    codes = rng.integers(-127, 128, size=(cout, cin, k, k))
    scales = rng.uniform(0.002, 0.01, size=cout)
    return codes, scales, rng.integers(-500, 500, size=cout), scales * in_scale


def toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its nodes in topological order (rewrites may append nodes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ready = {i.name for i in out.graph.input} | {t.name for t in out.graph.initializer} | {""}
    pending, ordered = list(out.graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        for n in pending:
            if n not in rest:
                ordered.append(n)
                ready.update(n.output)
        assert len(rest) < len(pending), "cycle"
        pending = rest
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    """The first output of ``model`` on ``x`` with ONNX Runtime's CPU provider (graph
    optimizations off by default: the graph's own semantics)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def optimized_graph(model: onnx.ModelProto, disabled: Sequence[str] = ()) -> onnx.ModelProto:
    """The graph ONNX Runtime actually runs for ``model`` (all optimizations on, ``disabled`` off)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled))
        return onnx.load(so.optimized_model_filepath)


def op_types(model: onnx.ModelProto) -> Dict[str, int]:
    """How many nodes of each kind ``model`` holds."""
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
