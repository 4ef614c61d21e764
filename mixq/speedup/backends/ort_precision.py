"""Which precision ONNX Runtime really runs, per node, read from its optimized graph."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import onnx
from onnx import TensorProto

INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu",
                   "QLinearSigmoid", "QLinearSoftmax", "QLinearConcat", "QLinearWhere", "DynamicQuantizeMatMul"}
_OUTPUT_ZERO_POINT = {"QLinearConv": 7, "QGemm": 8, "QLinearConcat": 1}
_FLOAT_OUTPUT = {"DequantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
_INT_TYPES = {TensorProto.UINT8, TensorProto.INT8}
# graph nodes that only annotate precision (no compute of a layer of their own)
ANNOTATION_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "Constant", "Identity"}



def _tensor_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Element type of every tensor, propagated through the node kinds an optimized graph holds
    (ONNX Runtime does not store value_info for its own contrib operators)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            out = types.get(node.input[2], TensorProto.UINT8) if len(node.input) > 2 else TensorProto.UINT8
        elif node.op_type in _FLOAT_OUTPUT:
            out = TensorProto.FLOAT
        elif node.op_type == "Cast":
            out = next(a.i for a in node.attribute if a.name == "to")
        elif node.op_type in INTEGER_KERNELS:
            index = _OUTPUT_ZERO_POINT.get(node.op_type, len(node.input) - 1)
            zp = node.input[index] if index < len(node.input) else ""
            out = types.get(zp, TensorProto.FLOAT) if zp else TensorProto.FLOAT
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            out = TensorProto.INT32
        else:
            out = types.get(node.input[0], TensorProto.FLOAT) if node.input else TensorProto.FLOAT
        for name in node.output:
            types.setdefault(name, out)
    return types


def node_precisions_from_optimized(refined: onnx.ModelProto, optimized: onnx.ModelProto) -> Dict[str, str]:
    """Per compute node of ``refined`` (by name): 'int8' if ONNX Runtime runs it as (part of) an
    integer kernel in ``optimized``, else 'fp32'.

    A node with quantized weights is integer when the optimized node that reads its int8 weight
    initializer is an integer kernel (a DequantizeLinear still reading it means float). Other
    nodes are integer when they survive under their name with integer inputs, or when they are
    gone together with the QuantizeLinear after them (fused into an integer kernel).
    """
    opt_nodes = {n.name: n for n in optimized.graph.node}
    opt_readers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
    for n in optimized.graph.node:
        for i in n.input:
            opt_readers[i].append(n)
    types = _tensor_types(optimized)
    inits = {t.name for t in refined.graph.initializer}
    producer = {o: n for n in refined.graph.node for o in n.output}
    readers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
    for n in refined.graph.node:
        for i in n.input:
            readers[i].append(n)

    int8_inits = {t.name for t in refined.graph.initializer if t.data_type == TensorProto.INT8}

    def weight_initializer(node: onnx.NodeProto) -> Optional[str]:
        if len(node.input) < 2:
            return None
        if node.input[1] in int8_inits:  # read directly (MatMulInteger of a dynamic layer)
            return node.input[1]
        dq = producer.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            return dq.input[0]
        return None

    result = {}
    for node in refined.graph.node:
        if node.op_type in ANNOTATION_OPS:
            continue
        weight = weight_initializer(node)
        if weight is not None and opt_readers.get(weight):
            kinds = {r.op_type for r in opt_readers[weight]}
            result[node.name] = "int8" if kinds & INTEGER_KERNELS else "fp32"
            continue
        kept = opt_nodes.get(node.name)
        if kept is not None:
            integer = kept.op_type in INTEGER_KERNELS or types.get(kept.input[0]) in _INT_TYPES if kept.input else False
            result[node.name] = "int8" if integer else "fp32"
            continue
        q_after = [r for r in readers.get(node.output[0], []) if r.op_type == "QuantizeLinear"] if node.output else []
        fused = bool(q_after) and all(q.name not in opt_nodes for q in q_after)
        result[node.name] = "int8" if fused else "fp32"
    return result
