"""HardSigmoid on ONNX Runtime's integer kernels: an Add of a constant whose output saturates.

``HardSigmoid(x) = clip(alpha * x + beta, 0, 1)``. On the output grid [0, 1] (uint8, zero point
0, scale 1/255, the range the placement fixes for it) its codes are

    saturate(round((alpha * x + beta) * 255)) = saturate(round((x + beta / alpha) / s)),  s = 1 / (255 * alpha)

the codes of ``x + beta / alpha`` quantized with scale ``s``: uint8 saturation *is* the clip.
So ``DQ -> HardSigmoid -> Q(1/255, 0)`` becomes ``DQ -> Add(DQ(beta / alpha)) -> Q(s, 0)``,
which ONNX Runtime fuses into one QLinearAdd; the DequantizeLinear nodes that read those codes
keep scale 1/255 and see the same HardSigmoid values. ONNX Runtime itself has no integer
HardSigmoid: its own quantizer runs it in float between a DequantizeLinear and a QuantizeLinear
(and HardSwish's product then as QLinearMul). On MobileNetV3's tensors the fused pair
(QLinearAdd + QLinearMul) ran a HardSwish 3.6x faster than that (microbenchmark in the #10 note).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...placement.onnx_graph import OnnxGraph

_RTOL = 1e-6


def _scalar(graph: OnnxGraph, name: str) -> Optional[np.ndarray]:
    value = graph.constant(name)
    return None if value is None or value.size != 1 else value.reshape(())


def _lowerable(graph: OnnxGraph, node: onnx.NodeProto) -> Optional[onnx.NodeProto]:
    """The QuantizeLinear after ``node`` when ``node`` is a HardSigmoid between a DequantizeLinear
    and a uint8 QuantizeLinear on the grid [0, 1], with alpha > 0 and beta > 0."""
    attrs = {a.name: a.f for a in node.attribute}
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    producer = graph.producer.get(node.input[0])
    readers = graph.readers(node.output[0])
    if alpha <= 0 or beta <= 0 or producer is None or producer.op_type != "DequantizeLinear" \
            or len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or node.output[0] in graph.outputs:
        return None
    q = readers[0]
    if len(q.input) < 3 or any(a.name == "axis" for a in q.attribute):
        return None
    scale, zero_point = _scalar(graph, q.input[1]), _scalar(graph, q.input[2])
    if scale is None or zero_point is None or zero_point.dtype != np.uint8 or int(zero_point) != 0:
        return None
    return q if abs(float(scale) * 255.0 - 1.0) <= _RTOL else None


def hardsigmoid_as_saturating_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every HardSigmoid on the [0, 1] uint8 grid written as a saturating Add (see
    the module docstring); the Add keeps the HardSigmoid's node name. Other nodes are unchanged."""
    graph = OnnxGraph(model)
    nodes = []
    for node in model.graph.node:
        q = _lowerable(graph, node) if node.op_type == "HardSigmoid" else None
        if q is None:
            nodes.append(node)
            continue
        attrs = {a.name: a.f for a in node.attribute}
        alpha, beta = np.float32(attrs.get("alpha", 0.2)), np.float32(attrs.get("beta", 0.5))
        stem = node.name or node.output[0]
        offset = f"{stem}/offset"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(1, np.uint8), f"{offset}_quantized"),
            numpy_helper.from_array(np.array(beta / alpha, np.float32), f"{offset}_scale"),
            numpy_helper.from_array(np.array(0, np.uint8), f"{offset}_zero_point"),
            numpy_helper.from_array(np.array(float(_scalar(graph, q.input[1])) / alpha, np.float32),
                                    f"{stem}/saturating_scale")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{offset}_quantized", f"{offset}_scale",
                                                           f"{offset}_zero_point"], [offset], f"{offset}/DequantizeLinear"))
        nodes.append(helper.make_node("Add", [node.input[0], offset], list(node.output), node.name))
        q.input[1] = f"{stem}/saturating_scale"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


__all__ = ["hardsigmoid_as_saturating_add"]
