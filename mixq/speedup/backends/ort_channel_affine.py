"""A BatchNorm between quantized tensors as a depthwise 1x1 integer conv on ONNX Runtime.

A BatchNorm that follows no conv (DenseNet's and pre-activation ResNets' BN -> ReLU -> conv on a
concatenation) is left in the graph by the export. ONNX Runtime has no integer BatchNorm, so its
own quantizer runs it in float: DequantizeLinear, BatchNormalization, QuantizeLinear, and, since
its float kernel is NCHW only, a pair of Transposes around it in the NHWC integer graph (on the
DenseNet of ``mixq.zoo``: 36 BatchNorms, 75 Transposes, a third of the int8 engine's time). Per
channel it is ``factor * x + shift``, a depthwise 1x1 conv: ``DQ -> BatchNormalization -> Q``
becomes ``DQ -> Conv(group=C, int8 weights holding factor exactly, int32 bias) -> Q``, which
ONNX Runtime fuses into one NHWC QLinearConv (codes and scales:
:mod:`mixq.compressor.integer_affine`, which the quantizers use to simulate the bias rounding).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...compressor.integer_affine import affine_codes, factor_and_shift
from ...placement.onnx_graph import OnnxGraph


def _input_scale(graph: OnnxGraph, node: onnx.NodeProto) -> Optional[float]:
    dq = graph.producer.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = graph.constant(dq.input[1])
    return float(scale.reshape(())) if scale is not None and scale.size == 1 else None


def _quantized_output(graph: OnnxGraph, node: onnx.NodeProto) -> bool:
    """The output is read by one QuantizeLinear, directly or through one ReLU (which ONNX Runtime
    folds into the QuantizeLinear of a zero-point-0 grid)."""
    tensor = node.output[0]
    for _ in range(2):
        readers = graph.readers(tensor)
        if tensor in graph.outputs or len(readers) != 1:
            return False
        if readers[0].op_type == "QuantizeLinear":
            return True
        if readers[0].op_type != "Relu":
            return False
        tensor = readers[0].output[0]
    return False


def batchnorm_as_depthwise_conv(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every 4-D BatchNormalization between a DequantizeLinear and a QuantizeLinear
    written as a depthwise 1x1 Conv on quantized weights and bias (same node name)."""
    graph = OnnxGraph(model)
    nodes = []
    for node in model.graph.node:
        scale = _input_scale(graph, node) if node.op_type == "BatchNormalization" else None
        shape = graph.shapes.get(node.input[0]) if scale is not None else None
        params = [graph.constant(i) for i in node.input[1:5]] if scale is not None else []
        if scale is None or not shape or len(shape) != 4 or any(p is None for p in params) \
                or not _quantized_output(graph, node):
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        factor, shift = factor_and_shift(*params, eps)
        w_codes, w_scale, b_codes, b_scale = affine_codes(factor, shift, scale)
        channels = len(factor)
        stem = node.name or node.output[0]
        model.graph.initializer.extend([
            numpy_helper.from_array(w_codes.reshape(channels, 1, 1, 1), f"{stem}.weight_quantized"),
            numpy_helper.from_array(w_scale, f"{stem}.weight_scale"),
            numpy_helper.from_array(np.zeros(channels, np.int8), f"{stem}.weight_zero_point"),
            numpy_helper.from_array(b_codes, f"{stem}.bias_quantized"),
            numpy_helper.from_array(b_scale, f"{stem}.bias_scale"),
            numpy_helper.from_array(np.zeros(channels, np.int32), f"{stem}.bias_zero_point")])
        for part in ("weight", "bias"):
            nodes.append(helper.make_node("DequantizeLinear", [f"{stem}.{part}_quantized", f"{stem}.{part}_scale",
                                                               f"{stem}.{part}_zero_point"],
                                          [f"{stem}.{part}_dequantized"], f"{stem}.{part}/DequantizeLinear", axis=0))
        nodes.append(helper.make_node("Conv", [node.input[0], f"{stem}.weight_dequantized", f"{stem}.bias_dequantized"],
                                      list(node.output), node.name, group=channels, kernel_shape=[1, 1]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


__all__ = ["batchnorm_as_depthwise_conv"]
