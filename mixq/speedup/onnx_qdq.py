"""Write a precision plan into the fp32 graph: QuantizeLinear/DequantizeLinear and Casts.

The result is the precision-annotated ONNX model every backend reads (DESIGN.md section 2):

* a quantized tensor ``t`` becomes ``producer -> t/pre -> Q -> DQ -> t`` (the last DQ keeps the
  name, so every reader and graph output sees the quantized value); a 2-7 bit grid adds a
  Clip after the DQ and a second, idempotent Q/DQ pair so readers still see a DQ output;
* a quantized edge (an input as seen by one module) gets its own pair before that node;
* integer weights are int8 initializers with per-channel float scales read by a DQ (axis 0,
  or the layout's channel axis); the bias of an integer Conv/Gemm becomes int32 with scale
  ``input_scale * weight_scale`` (zero point 0) where the input is quantized;
* fp16 nodes read Casts to fp16 and fp16 initializers; their outputs are cast back to fp32.
Activations are int8 here (symmetric: zero point 0); a backend may re-encode them, and one
that adds the bias in float (TensorRT) folds the int32 bias back with :func:`dequantize_bias`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..placement.onnx_graph import bypass, prune_initializers
from .grid import Grid
from .precision_plan import PrecisionPlan

MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear
_INT32_LIMIT = 2 ** 31 - 1


class _Names:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.used = {n.name for n in model.graph.node}
        self.used.update(t for n in model.graph.node for t in list(n.input) + list(n.output))
        self.used.update(i.name for i in model.graph.initializer)
        self.used.update(i.name for i in model.graph.input)

    def new(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


class _Annotator:
    def __init__(self, model: onnx.ModelProto, plan: PrecisionPlan) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.plan = plan
        self.names = _Names(self.model)
        self.inits: List[onnx.TensorProto] = []
        self.grid_params: Dict[Grid, Tuple[str, str]] = {}
        self.before: Dict[str, List[onnx.NodeProto]] = defaultdict(list)   # node name -> nodes to emit before
        self.after: Dict[str, List[onnx.NodeProto]] = defaultdict(list)    # node name -> nodes to emit after
        self.head: List[onnx.NodeProto] = []                               # before everything
        self.replaced: Dict[str, List[onnx.NodeProto]] = {}                # node name -> nodes standing for it
        self.dynamic_inputs: Dict[str, Tuple[str, str, str]] = {}          # tensor -> its DynamicQuantizeLinear outputs
        graph = self.model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.initializers = {i.name: i for i in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}

    # -- helpers ------------------------------------------------------------------------------
    def _init(self, base: str, array: np.ndarray) -> str:
        name = self.names.new(base)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def _params(self, grid: Grid) -> Tuple[str, str]:
        if grid not in self.grid_params:
            stem = f"qparams_{len(self.grid_params)}"
            self.grid_params[grid] = (self._init(f"{stem}.scale", np.array(grid.scale, dtype=np.float32)),
                                      self._init(f"{stem}.zero_point", np.array(grid.zero_point, dtype=np.int8)))
        return self.grid_params[grid]

    def _qdq(self, src: str, grid: Grid, dst: str, stem: str) -> List[onnx.NodeProto]:
        scale, zp = self._params(grid)
        q_out = self.names.new(f"{stem}/quantized")
        nodes = [helper.make_node("QuantizeLinear", [src, scale, zp], [q_out], name=self.names.new(f"{stem}/QuantizeLinear"))]
        if not grid.needs_clip:
            nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dst],
                                          name=self.names.new(f"{stem}/DequantizeLinear")))
            return nodes
        dq_out, clip_out = self.names.new(f"{stem}/dequantized"), self.names.new(f"{stem}/clipped")
        lo = self._init(f"{stem}.clip_min", np.array(grid.real_min, dtype=np.float32))
        hi = self._init(f"{stem}.clip_max", np.array(grid.real_max, dtype=np.float32))
        nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                                      name=self.names.new(f"{stem}/DequantizeLinear")))
        nodes.append(helper.make_node("Clip", [dq_out, lo, hi], [clip_out], name=self.names.new(f"{stem}/Clip")))
        return nodes + self._qdq(clip_out, Grid(grid.scale, -128 - grid.zero_point, 127 - grid.zero_point), dst,
                                 f"{stem}/narrow")

    def _chain(self, src: str, grids: List[Grid], dst: str, stem: str) -> List[onnx.NodeProto]:
        nodes, current = [], src
        for i, grid in enumerate(grids):
            out = dst if i == len(grids) - 1 else self.names.new(f"{stem}/step{i}")
            nodes += self._qdq(current, grid, out, stem)
            current = out
        return nodes

    def _fp16_round_trip(self, src: str, dst: str, stem: str) -> List[onnx.NodeProto]:
        half = self.names.new(f"{stem}/fp16")
        return [helper.make_node("Cast", [src], [half], to=TensorProto.FLOAT16, name=self.names.new(f"{stem}/CastFp16")),
                helper.make_node("Cast", [half], [dst], to=TensorProto.FLOAT, name=self.names.new(f"{stem}/CastFp32"))]

    def _wrap_tensor(self, tensor: str, build) -> None:
        """Put nodes built by ``build(src, dst)`` right after ``tensor``'s producer; readers keep the name."""
        producer = self.producer.get(tensor)
        if producer is None:  # a graph input: readers are renamed instead
            new = self.names.new(f"{tensor}/annotated")
            self.head += build(tensor, new)
            for node in self.model.graph.node:
                for i, name in enumerate(node.input):
                    if name == tensor and node not in self.head:
                        node.input[i] = new
            return
        pre = self.names.new(f"{tensor}/pre")
        for i, name in enumerate(producer.output):
            if name == tensor:
                producer.output[i] = pre
        self.producer[pre] = producer
        self.after[producer.name] += build(pre, tensor)

    def _wrap_edge(self, tensor: str, node: onnx.NodeProto, build) -> None:
        new = self.names.new(f"{tensor}/{node.name}")
        self.before[node.name] += build(tensor, new)
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = new

    # -- passes -------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        graph = self.model.graph
        nodes = {n.name: n for n in graph.node}
        plan = self.plan
        # edges first (they read the tensor name, which a tensor chain keeps)
        for (tensor, node_name), grid in plan.edge_grids.items():
            self._wrap_edge(tensor, nodes[node_name], lambda s, d, g=grid, t=tensor: self._qdq(s, g, d, t))
        for tensor, node_name in plan.edge_fp16:
            if node_name not in plan.fp16_nodes:
                self._wrap_edge(tensor, nodes[node_name], lambda s, d, t=tensor: self._fp16_round_trip(s, d, t))
        for tensor, grids in plan.tensor_grids.items():
            if grids:
                self._wrap_tensor(tensor, lambda s, d, g=grids, t=tensor: self._chain(s, g, d, t))
        for tensor in plan.tensor_fp16:
            self._wrap_tensor(tensor, lambda s, d, t=tensor: self._fp16_round_trip(s, d, t))
        for node_name, wq in plan.weights.items():
            self._quantize_weight(nodes[node_name], wq)
        order = {n.name: i for i, n in enumerate(graph.node)}
        for node_name in sorted(plan.dynamic, key=order.__getitem__):  # the first reader emits the shared quantization
            self._dynamic_matmul(nodes[node_name], plan.dynamic[node_name])
        for node_name in plan.fp16_nodes:
            self._to_fp16(nodes[node_name])
        ordered = list(self.head)
        for node in graph.node:
            body = self.replaced.get(node.name, [node])
            ordered += self.before.get(node.name, []) + body + self.after.get(node.name, [])
        del graph.node[:]
        graph.node.extend(ordered)
        graph.initializer.extend(self.inits)
        prune_initializers(self.model)
        _ensure_opset(self.model)
        return self.model

    def _input_scale(self, node: onnx.NodeProto) -> Optional[float]:
        """Scale of the DQ that feeds ``node``'s data input, if any."""
        src = node.input[0]
        for n in self.before.get(node.name, []) + [m for ms in self.after.values() for m in ms] + self.head:
            if n.op_type == "DequantizeLinear" and n.output[0] == src:
                return float(numpy_helper.to_array(self._initializer(n.input[1])))
        return None

    def _initializer(self, name: str) -> onnx.TensorProto:
        for t in self.inits:
            if t.name == name:
                return t
        return self.initializers[name]

    def _quantize_weight(self, node: onnx.NodeProto, wq) -> None:
        stem = f"{node.name}.weight"
        codes = self._init(f"{stem}_quantized", wq.codes)
        scale = self._init(f"{stem}_scale", wq.scales if wq.axis is not None else wq.scales.reshape(()))
        zp = self._init(f"{stem}_zero_point", wq.zero_points if wq.axis is not None else wq.zero_points.reshape(()))
        out = self.names.new(f"{stem}_dequantized")
        attrs = {"axis": wq.axis} if wq.axis is not None else {}
        self.before[node.name].append(helper.make_node("DequantizeLinear", [codes, scale, zp], [out],
                                                       name=self.names.new(f"{stem}/DequantizeLinear"), **attrs))
        node.input[1] = out
        if len(node.input) > 2 and node.input[2] and node.op_type in ("Conv", "Gemm"):
            self._quantize_bias(node, wq)

    def _dynamic_matmul(self, node: onnx.NodeProto, wq) -> None:
        """MatMul/Gemm -> DynamicQuantizeLinear (uint8, per tensor, at run time) + MatMulInteger
        with the int8 weight + Cast + Mul by ``input_scale * weight_scale`` (+ the Gemm's bias):
        what ONNX Runtime fuses into DynamicQuantizeMatMul, or, where several layers read the same
        tensor (an attention block's Q/K/V projections) and share one DynamicQuantizeLinear, into
        MatMulIntegerToFloat: the tensor is quantized once, with the same codes for every reader."""
        codes, scales, zps, axis = wq.codes, wq.scales, wq.zero_points, wq.axis
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        if trans_b:  # MatMulInteger takes B as (K, N)
            codes = codes.T
            axis = None if axis is None else 1 - axis
        if axis not in (None, 1):
            raise ValueError(f"node {node.name}: dynamic quantization needs per-column weight scales, got axis {axis}")
        stem = f"{node.name}.dynamic"
        x = node.input[0]
        shared = x in self.dynamic_inputs
        if not shared:
            self.dynamic_inputs[x] = tuple(self.names.new(f"{stem}/x_{p}") for p in ("quantized", "scale", "zero_point"))
        xq, xs, xz = self.dynamic_inputs[x]
        w = self._init(f"{stem}/weight_quantized", np.ascontiguousarray(codes))
        wz = self._init(f"{stem}/weight_zero_point", zps.astype(np.int8).reshape(-1) if axis is not None
                        else zps.astype(np.int8).reshape(()))
        ws = self._init(f"{stem}/weight_scale", scales.astype(np.float32).reshape(-1) if axis is not None
                        else scales.astype(np.float32).reshape(()))
        product, as_float, scale = (self.names.new(f"{stem}/{p}") for p in ("int32", "float", "scale"))
        out = node.output[0]
        result = self.names.new(f"{stem}/unbiased") if node.op_type == "Gemm" and len(node.input) > 2 else out
        emitted = [] if shared else [
            helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=self.names.new(f"{stem}/DynamicQuantizeLinear"))]
        emitted += [
            helper.make_node("MatMulInteger", [xq, w, xz, wz], [product], name=node.name),
            helper.make_node("Cast", [product], [as_float], to=TensorProto.FLOAT, name=self.names.new(f"{stem}/Cast")),
            helper.make_node("Mul", [xs, ws], [scale], name=self.names.new(f"{stem}/ScaleMul")),
            helper.make_node("Mul", [as_float, scale], [result], name=self.names.new(f"{stem}/OutputMul"))]
        if result != out:
            emitted.append(helper.make_node("Add", [result, node.input[2]], [out], name=self.names.new(f"{stem}/BiasAdd")))
        self.replaced[node.name] = emitted

    def _quantize_bias(self, node: onnx.NodeProto, wq) -> None:
        in_scale = self._input_scale(node)
        bias_init = self.initializers.get(node.input[2])
        channel_axis_ok = wq.axis is None or wq.axis == 0 or node.op_type == "Gemm"
        if in_scale is None or bias_init is None or not channel_axis_ok:
            return
        bias = numpy_helper.to_array(bias_init).astype(np.float64)
        scales = (np.float32(in_scale) * wq.scales).astype(np.float32)
        scales = np.broadcast_to(scales, bias.shape).astype(np.float32)
        q = np.round(bias / scales.astype(np.float64))
        if np.abs(q).max(initial=0) > _INT32_LIMIT:
            return
        stem = f"{node.name}.bias"
        codes = self._init(f"{stem}_quantized", q.astype(np.int32))
        scale = self._init(f"{stem}_scale", scales)
        zp = self._init(f"{stem}_zero_point", np.zeros(bias.shape, dtype=np.int32))
        out = self.names.new(f"{stem}_dequantized")
        self.before[node.name].append(helper.make_node("DequantizeLinear", [codes, scale, zp], [out], axis=0,
                                                       name=self.names.new(f"{stem}/DequantizeLinear")))
        node.input[2] = out

    def _to_fp16(self, node: onnx.NodeProto) -> None:
        for i, name in enumerate(node.input):
            if not name:
                continue
            init = self.initializers.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT:
                node.input[i] = self._init(f"{name}_fp16", numpy_helper.to_array(init).astype(np.float16))
            elif init is None:
                half = self.names.new(f"{name}/{node.name}/fp16")
                self.before[node.name].append(helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16,
                                                               name=self.names.new(f"{node.name}/CastInputFp16")))
                node.input[i] = half
        for i, name in enumerate(node.output):
            half = self.names.new(f"{name}/fp16")
            node.output[i] = half
            # first after the node: Q/DQ already placed after it read the fp32 output
            self.after[node.name].insert(0, helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT,
                                                             name=self.names.new(f"{node.name}/CastOutputFp32")))


def _ensure_opset(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < MIN_OPSET:
            opset.version = MIN_OPSET


def annotate(model: onnx.ModelProto, plan: PrecisionPlan) -> onnx.ModelProto:
    """A copy of the fp32 ``model`` with ``plan`` written in as Q/DQ pairs, integer weights and Casts."""
    annotated = _Annotator(model, plan).run()
    onnx.checker.check_model(annotated)
    return annotated


def dequantize_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an annotated model whose int32 bias DequantizeLinear nodes are folded into float
    initializers (``codes * scale``), for backends that add the bias in float (TensorRT)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    folded: Dict[str, str] = {}
    removed = []
    for node in graph.node:
        source = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is None or source.data_type != TensorProto.INT32:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        values = numpy_helper.to_array(source).astype(np.float32) * scale
        name = f"{node.output[0]}.float"
        graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
        folded[node.output[0]] = name
        removed.append(node)
    bypass(result, removed, folded)
    prune_initializers(result)
    return result
