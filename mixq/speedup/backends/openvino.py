"""OpenVINO backend: the precision-annotated ONNX compiled by OpenVINO's CPU plugin.

OpenVINO's ONNX frontend reads the annotated graph (each QuantizeLinear/DequantizeLinear pair
becomes a FakeQuantize) and its low-precision transformations run Convolution/MatMul in u8 x i8
where FakeQuantizes feed them, the placement of :data:`mixq.placement.op_rules.OPENVINO`. The
activations are re-encoded as uint8 first (the same grids): with int8 codes and a zero point,
oneDNN's int8 convolutions ran 7x slower (CIFAR ResNet-18, batch 128: 858 ms against 125 ms). The engine is compiled with f32 as the inference
precision (OpenVINO otherwise runs float layers in bf16 on CPUs with AMX, which would change
the fp32 layers' results), the engine's thread count, one stream and a dynamic batch axis.

What ran is read from the compiled model (``get_runtime_model()``): each runtime node names
the graph nodes it absorbed (``originalLayersNames``) and the precision it executes in
(``runtimePrecision``); a graph node no runtime node names is 'unknown', never a guess. A saved
engine holds OpenVINO's own serialized compiled model (``export_model``), loadable by the same
OpenVINO version only (the engine file records it and loading checks it).
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx

from .base import UNKNOWN, Backend, BackendUnavailable, BuildOptions, Engine, EngineFormatError
from .ort_precision import ANNOTATION_OPS
from .ort_refiner import activations_as_uint8

INSTALL = 'pip install "mixq[openvino]" (or pip install openvino)'
DEVICE = "CPU"
_FRONTEND_MARKERS = ("/WithoutBiases",)  # the ONNX frontend splits a Conv/Gemm into the product and a bias Add
_PRECISIONS = {"u8": "int8", "i8": "int8", "f32": "fp32", "f16": "fp16"}
# runtime nodes that compute a layer (others carry data: reorders, FakeQuantize, reshapes)
_COMPUTE_TYPES = {"Convolution", "Deconvolution", "FullyConnected", "MatMul", "Eltwise", "Pooling", "Concatenation",
                  "Subgraph", "Softmax", "MVN", "Interpolate", "Reduce", "Math", "Gather"}


def _import_ov():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"OpenVINO is not installed ({exc}); {INSTALL}") from None
    return openvino


def _config(options: BuildOptions) -> Dict[str, object]:
    return {"INFERENCE_NUM_THREADS": int(options.num_threads), "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


def _graph_node(original: str, names: Dict[str, str]) -> str:
    """The annotated-graph node a runtime node's original name stands for, or ''. ``names``
    maps node names, and the names of graph outputs (the frontend names a graph output's
    producer after the output), to node names."""
    if original in names:
        return names[original]
    for marker in _FRONTEND_MARKERS:
        if marker in original and original[:original.index(marker)] in names:
            return names[original[:original.index(marker)]]
    return ""


def node_precisions_from_runtime(graph_nodes: Sequence[onnx.NodeProto], graph_outputs: Sequence[str],
                                 runtime_model) -> Dict[str, str]:
    """Per compute node of the annotated graph (by name): the precision of the runtime node of
    a computing type that absorbed it ('int8' for u8/i8, 'fp32', 'fp16'); a node absorbed only
    into data-movement nodes runs as those do. A node no runtime node names was folded away: it
    is 'int8' when every reader of its output is a QuantizeLinear inside an integer kernel (a
    ReLU/Clip folded into the quantization after it), else 'unknown'."""
    all_names = {n.name: n.name for n in graph_nodes}
    all_names.update({out: n.name for n in graph_nodes for out in n.output if out in graph_outputs})
    names = {n.name for n in graph_nodes if n.op_type not in ANNOTATION_OPS}
    found: Dict[str, List[tuple]] = {}
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" not in info:
            continue
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        precision = _PRECISIONS.get(info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "", UNKNOWN)
        for original in info["originalLayersNames"].astype(str).split(","):
            node = _graph_node(original.strip(), all_names)
            if node:
                found.setdefault(node, []).append((kind in _COMPUTE_TYPES, precision))

    def precision_of(name: str) -> str:
        hits = found.get(name, [])
        computing = [p for is_compute, p in hits if is_compute] or [p for _, p in hits]
        return computing[0] if computing and len(set(computing)) == 1 else UNKNOWN

    readers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph_nodes:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    result = {}
    for node in graph_nodes:
        if node.name not in names:
            continue
        if node.name in found:
            result[node.name] = precision_of(node.name)
            continue
        after = readers.get(node.output[0], []) if node.output else []
        folded = bool(after) and all(r.op_type == "QuantizeLinear" and precision_of(r.name) == "int8" for r in after)
        result[node.name] = "int8" if folded else UNKNOWN
    return result


class OpenVinoEngine(Engine):
    """A compiled OpenVINO model and one infer request."""

    backend = "openvino"

    def __init__(self, compiled, graph: Optional[onnx.GraphProto]) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in compiled.inputs]
        self.output_names = [p.get_any_name() for p in compiled.outputs]
        self.runtime_model = compiled.get_runtime_model()  # what runs (tests read its layer types)
        self._precisions = {} if graph is None else node_precisions_from_runtime(
            list(graph.node), [o.name for o in graph.output], self.runtime_model)

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        results = self.request.infer({i: np.ascontiguousarray(a) for i, a in enumerate(inputs)})
        return [np.array(results[out]) for out in self.compiled.outputs]

    def serialize(self) -> bytes:
        return self.compiled.export_model().getvalue()

    def node_precisions(self) -> Dict[str, str]:
        return dict(self._precisions)


class OpenVinoBackend(Backend):
    """Builds :class:`OpenVinoEngine` s on OpenVINO's CPU plugin."""

    name = "openvino"
    fp16_reason = "compiled with f32 inference precision on the CPU: fp16 layers run in fp32"

    def check_available(self) -> None:
        _import_ov()

    def version(self) -> str:
        return str(_import_ov().__version__)

    def build(self, model: onnx.ModelProto, options: BuildOptions) -> OpenVinoEngine:
        ov = _import_ov()
        core = ov.Core()
        model = activations_as_uint8(model)
        compiled = core.compile_model(core.read_model(model.SerializeToString()), DEVICE, _config(options))
        return OpenVinoEngine(compiled, model.graph)

    def deserialize(self, payload: bytes, options: BuildOptions) -> OpenVinoEngine:
        ov = _import_ov()
        try:
            compiled = ov.Core().import_model(io.BytesIO(payload), DEVICE, _config(options))
        except RuntimeError as exc:
            raise EngineFormatError(f"OpenVINO cannot import the compiled model ({str(exc).strip()[:200]})") from None
        return OpenVinoEngine(compiled, None)  # a loaded engine's report comes from its file
