"""The precision report: what the backend actually compiled, per layer, per placed op, in total.

Rows (dicts): ``kind`` 'layer' for every configured layer, 'op' for each operator outside the
configured layers that carries quantization (a residual Add, a Concat, pooling, an activation
the placement made integer), and one final 'summary' row: the share of the model's
multiply-accumulates that run in integer kernels. ``actual`` is 'int8', 'fp16' or 'fp32' as read
from the built engine, or 'unknown' where the backend's state for a node cannot be read: it is
never guessed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import onnx

from ..placement.onnx_graph import WEIGHTED_OPS, OnnxGraph
from .backends.base import PRECISION_ORDER
from .precision_plan import PrecisionPlan

_ANNOTATION_OPS = {"QuantizeLinear", "DequantizeLinear", "Cast", "Constant", "Identity", "Clip"}
Row = Dict[str, Any]


def _layer_reason(layer, actual: str, plan: PrecisionPlan, backend: Any) -> str:
    if actual == layer.requested:
        return ""
    if actual == "unknown":
        return f"{backend.name} does not say how it built this layer"
    if layer.note:
        return layer.note
    fp16_reason = getattr(backend, "fp16_reason", "")
    if layer.requested == "fp16" and fp16_reason:
        return fp16_reason
    reason = f"{backend.name} did not build it as an {layer.requested} kernel"
    note = plan.notes.get(layer.nodes[0]) if layer.nodes else None
    return reason + (f" ({note})" if note else "")


def _quantized_ops(annotated: onnx.ModelProto, claimed: set) -> List[onnx.NodeProto]:
    """Nodes outside the configured layers that read a dequantized activation or feed a Q."""
    inits = {t.name for t in annotated.graph.initializer}
    producer = {o: n for n in annotated.graph.node for o in n.output}
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for n in annotated.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found = []
    for node in annotated.graph.node:
        if node.op_type in _ANNOTATION_OPS or node.name in claimed:
            continue
        reads_dq = any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                       and producer[i].input[0] not in inits for i in node.input)
        feeds_q = any(r.op_type == "QuantizeLinear" for o in node.output for r in readers.get(o, []))
        if reads_dq and feeds_q:
            found.append(node)
    return found


def build_report(plan: PrecisionPlan, precisions: Mapping[str, str], backend: Any, fp32_model: onnx.ModelProto,
                 annotated: onnx.ModelProto, sample: Optional[Mapping[str, np.ndarray]] = None) -> List[Row]:
    """Rows for the configured layers, the placed ops and the integer share of MACs
    (``sample``: one sample's inputs by name, so that every MAC is counted)."""
    rows: List[Row] = []
    claimed = set()
    weighted = {n.name for n in fp32_model.graph.node if n.op_type in WEIGHTED_OPS}
    for layer in plan.layers.values():
        # a Conv/Linear runs at its multiply-accumulate node's precision (a bias Add beside it does not count)
        nodes = [n for n in layer.nodes if n in weighted] or layer.nodes
        found = [precisions.get(n, "unknown") for n in nodes]
        actual = max(found, key=PRECISION_ORDER.__getitem__) if found else ("fp32" if layer.note else "unknown")
        claimed.update(layer.nodes)
        rows.append({"kind": "layer", "layer": layer.name, "requested": layer.requested, "actual": actual,
                     "reason": _layer_reason(layer, actual, plan, backend)})
    for node in _quantized_ops(annotated, claimed):
        actual = precisions.get(node.name, "unknown")
        reason = "" if actual == "int8" else (f"{backend.name} runs {node.op_type} in float here" if actual != "unknown"
                                              else f"{backend.name} does not say how it built this op")
        rows.append({"kind": "op", "layer": node.name, "op": node.op_type, "requested": "int8", "actual": actual,
                     "reason": reason})
    graph = OnnxGraph(fp32_model, {k: v.shape for k, v in sample.items()} if sample is not None else None)
    if sample is not None:
        graph.shapes.update(_measured_shapes(graph, fp32_model, sample))
    rows.append(mac_summary(graph, precisions))
    return rows


def _measured_shapes(graph: OnnxGraph, model: onnx.ModelProto, sample: Mapping[str, np.ndarray]
                     ) -> Dict[str, List[int]]:
    """Shapes of the multiply-accumulate nodes' tensors that shape inference left open (sizes
    computed from other tensors' shapes, as attention's head size often is), from one ONNX
    Runtime run of ``model`` on ``sample``."""
    import onnxruntime as ort

    open_ = sorted({t for node in graph.nodes if node.op_type in WEIGHTED_OPS for t in (node.input[0], node.output[0])
                    if t and t not in graph.initializers and None in graph.shapes.get(t, [None])})
    if not open_:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in open_ if t not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    values = session.run(open_, {k: v for k, v in sample.items() if k in inputs})
    return {t: list(v.shape) for t, v in zip(open_, values)}


def mac_summary(graph: OnnxGraph, precisions: Mapping[str, str]) -> Row:
    """The summary row: multiply-accumulates per sample in integer kernels, of all, and of the
    layers with stored weights (Conv/Linear; attention's products of two activations aside)."""
    total = integer = unknown = weighted = weighted_integer = 0
    for node in graph.nodes:
        if node.op_type not in WEIGHTED_OPS:
            continue
        macs = graph.macs(node)
        total += macs
        state = precisions.get(node.name, "unknown")
        integer += macs if state == "int8" else 0
        unknown += macs if state == "unknown" else 0
        if graph.weight_initializer(node) is not None:
            weighted += macs
            weighted_integer += macs if state == "int8" else 0
    share = integer / total if total else 0.0
    reason = f"{_count(integer)} of {_count(total)} multiply-accumulates per sample run in integer kernels"
    if weighted != total:
        reason += f" ({_count(weighted_integer)} of {_count(weighted)} of the layers with weights)"
    if unknown:
        reason += f"; {_count(unknown)} unknown"
    return {"kind": "summary", "layer": "(all)", "requested": "", "actual": f"{share:.1%} int8", "reason": reason,
            "integer_mac_share": share, "macs": total,
            "weight_mac_share": weighted_integer / weighted if weighted else 0.0}


def _count(n: float) -> str:
    """``n`` with a unit prefix (436.2 M, 13.4 k)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def layer_rows(report: List[Row]) -> List[Row]:
    """The per-layer rows of a report (older reports have no 'kind': all rows are layers)."""
    return [r for r in report if r.get("kind", "layer") == "layer"]


def summary_row(report: List[Row]) -> Optional[Row]:
    return next((r for r in report if r.get("kind") == "summary"), None)
