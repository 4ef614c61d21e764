"""TensorRT conformance checker: will TensorRT 10/11's ONNX parser and strongly typed builder
accept this precision-annotated ONNX graph? Runs on the CPU, without ``tensorrt``.

Every rule cites where TensorRT documents it:

* ``NvInfer.h`` (NVIDIA/TensorRT ``include/``, ``release/10.x`` and ``main`` at 11.1): the doc
  blocks of ``IQuantizeLayer``, ``IDequantizeLayer`` and ``IBuilder::createNetworkV2``;
* onnx-tensorrt ``onnxOpImporters.cpp`` (``QuantDequantLinearHelper``), the parser that
  TensorRT ships;
* onnx-tensorrt ``docs/operators.md`` (the supported-operator matrix; "TensorRT 10.0 supports
  operators in the inclusive range of opset 9 to opset 20", 10.15: "... to opset 24") and the
  TensorRT 11 "ONNX Opset Guide" (maximum opset 25);
* the ONNX operator specification (type constraints), for what the parser assumes.

Each violation names the node, the rule, and, given the plan's ``{layer: [node names]}`` map,
the config layer(s) it serves and the config key to change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto

from .tensorrt_graph import DEFAULT_DOMAINS, FLOAT_TYPES, GraphFacts, LayerLocator, node_attr, type_name

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear (ONNX spec; the parser's default axis below 13 is 0)


@dataclass(frozen=True)
class Rule:
    """One documented TensorRT requirement."""

    id: str
    summary: str
    source: str


RULES: Dict[str, Rule] = {r.id: r for r in (
    Rule("onnx-valid", "the graph is valid ONNX for the opset it declares",
         "ONNX IR/operator spec (onnx.checker); a number-only opset bump leaves attributes the opset lacks"),
    Rule("opset", f"ai.onnx opset between {MIN_OPSET} and the parser's maximum",
         "onnx-tensorrt docs/operators.md (10.0: opsets 9-20; 10.15: 9-24); TensorRT 11 ONNX Opset Guide "
         "(max 25); per-axis Q/DQ need opset 13 (ONNX spec, onnxOpImporters.cpp QuantDequantLinearHelper)"),
    Rule("supported-op", "every node is an ai.onnx operator the parser supports",
         "onnx-tensorrt docs/operators.md (Operator Support Matrix)"),
    Rule("dq-input-type", "DequantizeLinear reads INT8 (or FP8/INT4/FP4), never INT32 or UINT8",
         "NvInfer.h IDequantizeLayer (input type kINT8/kFP8/kINT4/kFP4); docs/operators.md DequantizeLinear; "
         "NVIDIA/TensorRT#3360, onnx/onnx-tensorrt#850"),
    Rule("q-input-type", "QuantizeLinear reads FLOAT/FLOAT16/BFLOAT16 (FLOAT below opset 19)",
         "NvInfer.h IQuantizeLayer (input kFLOAT/kHALF/kBF16); ONNX QuantizeLinear-13 (T1: float)"),
    Rule("zero-point", "Q/DQ zero points are build-time constants holding only zeros",
         "NvInfer.h IQuantizeLayer/IDequantizeLayer ('zeroPt must only contain zero-valued coefficients'); "
         "onnxOpImporters.cpp shiftIsAllZeros ('Non-zero zero point is not supported')"),
    Rule("zero-point-type", "Q/DQ zero points are INT8 (UINT8 is imported as INT8 or rejected)",
         "onnxOpImporters.cpp QuantDequantLinearHelper (UINT8 only on DLA with "
         "kENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA); docs/operators.md ('UINT8 is only supported as "
         "network input or output')"),
    Rule("scale", "scales are positive floats, scalar or 1-D, one per channel of the axis, sized like the zero point",
         "NvInfer.h IQuantizeLayer/IDequantizeLayer; onnxOpImporters.cpp ('Scale coefficients must all be "
         "positive', 'The scale and zero point must have the same volume', 'number of scales')"),
    Rule("scale-type", "a QuantizeLinear scale is FLOAT or the type of its input (FLOAT below opset 19)",
         "NvInfer.h IQuantizeLayer ('For strongly typed networks, if the scale data type is kHALF or kBF16, "
         "it must match the input data type'); ONNX QuantizeLinear-13 (y_scale: float)"),
    Rule("per-channel-weights-only", "per-channel (1-D scale) Q/DQ only on constant weights",
         "NvInfer.h IDequantizeLayer ('Per-channel dequantization is supported only for input that is rooted "
         "at an IConstantLayer'), IQuantizeLayer ('Activations cannot be quantized per-channel')"),
    Rule("strong-typing", "the float inputs of one operator share one type (Casts close every fp16 region)",
         "NvInfer.h IBuilder::createNetworkV2 ('tensor data types are inferred from network input types and "
         "operator type specification'); TensorRT Operators reference and ONNX schemas (inputs of type T)"),
    Rule("io-float32", "graph inputs and outputs are FLOAT: fp16 regions start and end with a Cast",
         "mixq annotated-graph contract (DESIGN.md section 2, onnx_qdq.py): engines exchange float32 with torch"),
)}

# ai.onnx operators the parser supports: the 'Y' rows of onnx-tensorrt docs/operators.md at 10.0-GA
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# rows that turn 'Y' later, with the first release whose operators.md lists them (10.15)
LATER_OPS = {op: (10, 15) for op in ("Attention", "BlackmanWindow", "HammingWindow", "HannWindow",
                                     "RMSNormalization", "RotaryEmbedding", "STFT", "TensorScatter")}
# highest supported opset per release: operators.md (10.0, 10.15), ONNX Opset Guide (11.x)
MAX_OPSET = {(10, 0): 20, (10, 15): 24, (11, 0): 25}

QUANTIZED_TYPES = frozenset(t for t in (TensorProto.INT8, getattr(TensorProto, "FLOAT8E4M3FN", None),
                                        getattr(TensorProto, "INT4", None), getattr(TensorProto, "FLOAT4E2M1", None))
                            if t is not None)
Q_INPUT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
_ALL = None  # every input
# inputs an operator's schema binds to one type variable T (ONNX schemas; TensorRT operator reference)
SAME_TYPE_INPUTS: Dict[str, Optional[Tuple[int, ...]]] = {
    "Conv": (0, 1, 2), "ConvTranspose": (0, 1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Add": (0, 1),
    "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1), "PRelu": (0, 1), "Clip": (0, 1, 2), "Where": (1, 2),
    "InstanceNormalization": (0, 1, 2), "LayerNormalization": (0, 1, 2), "Equal": (0, 1), "Less": (0, 1),
    "Greater": (0, 1), "Sum": _ALL, "Max": _ALL, "Min": _ALL, "Mean": _ALL, "Concat": _ALL, "Einsum": _ALL,
}
# operators that compute in float only: every input must be a float tensor (e.g. no INT32 bias)
FLOAT_ONLY_INPUTS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def version_tuple(version: Optional[str]) -> Optional[Tuple[int, int]]:
    """``'10.13.0.35'`` -> ``(10, 13)``; None for None or an unparsable string."""
    if not version:
        return None
    try:
        parts = [int(p) for p in str(version).split(".")[:2]]
    except ValueError:
        return None
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def max_opset(version: Optional[str] = None) -> int:
    """Highest ai.onnx opset the parser of TensorRT ``version`` documents (the oldest supported,
    10.0, when the version is not known: a graph that passes builds on every TensorRT 10/11)."""
    v = version_tuple(version) or (10, 0)
    return max((o for release, o in MAX_OPSET.items() if release <= v), default=MAX_OPSET[(10, 0)])


def supported_ops(version: Optional[str] = None) -> frozenset:
    v = version_tuple(version) or (10, 0)
    return SUPPORTED_OPS | {op for op, since in LATER_OPS.items() if since <= v}


@dataclass
class Violation:
    """One rule broken by one node (``node`` is '' for graph-level rules)."""

    rule: str
    node: str
    op_type: str
    message: str
    layers: List[Tuple[str, str]] = field(default_factory=list)  # (config layer, 'node'|'input'|'output')
    fix: str = ""
    layers_known: bool = True

    def where(self) -> str:
        if self.layers:
            parts = [f"'{layer}'" + ("" if role == "node" else f" ({role})") for layer, role in self.layers]
            return "config layer " + ", ".join(parts)
        if not self.layers_known:
            return "config layer not known (pass the plan's layer_nodes to name it)"
        return "no config layer (a part of the model the config leaves alone)"

    def __str__(self) -> str:
        node = f"node '{self.node}' ({self.op_type})" if self.node else "the graph"
        source = RULES[self.rule].source.split(";")[0]
        text = f"{self.where()}: {node}: {self.message} [rule {self.rule}, {source}]"
        return text + (f"; fix: {self.fix}" if self.fix else "")


class TensorRTConformanceError(ValueError):
    """The graph breaks rules TensorRT documents; raised before anything is built."""

    def __init__(self, violations: Sequence[Violation], limit: int = 25) -> None:
        self.violations = list(violations)
        lines = [f"- {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"- ... and {len(self.violations) - limit} more")
        super().__init__(f"TensorRT would reject this graph ({len(self.violations)} problem(s)); nothing was "
                         "built:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
Finding = Tuple[str, str, str]  # (rule, message, fix)


def _values(array: np.ndarray, limit: int = 4) -> str:
    flat = array.reshape(-1)
    shown = ", ".join(str(v) for v in flat[:limit])
    return f"[{shown}{', ...' if flat.size > limit else ''}]"


def _grid_fix(facts: GraphFacts, node: onnx.NodeProto) -> str:
    if facts.is_constant(node.input[0]):
        return ("quantize this weight symmetrically: 'quant_scheme': 'per_channel_symmetric' (or "
                "'per_tensor_symmetric') for 'weight'")
    return ("quantize this activation symmetrically for TensorRT: 'quant_scheme': 'per_tensor_symmetric' and "
            "'quant_dtype': 'int' for the 'input'/'output' quant type of the layer(s) named")


def _check_qdq(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[Finding]:
    is_dq = node.op_type == "DequantizeLinear"
    data = node.input[0]
    scale = node.input[1] if len(node.input) > 1 else ""
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    data_t, scale_t = facts.elem_type(data), facts.elem_type(scale)
    if is_dq and data_t is not None and data_t not in QUANTIZED_TYPES:
        fix = ("mixq folds int32 biases into float before building (prepare_for_tensorrt); keep biases in float"
               if data_t == TensorProto.INT32 else "use 'quant_dtype': 'int' (int8 storage)")
        yield "dq-input-type", f"reads {type_name(data_t)}, TensorRT dequantizes only INT8/FP8/INT4/FP4", fix
    if not is_dq and data_t is not None:
        allowed = Q_INPUT_TYPES if facts.opset >= 19 else {TensorProto.FLOAT}
        if data_t not in allowed:
            yield ("q-input-type", f"quantizes a {type_name(data_t)} tensor at opset {facts.opset}",
                   "quantize the float32 tensor (cast back to float32 before the QuantizeLinear)")
    if zp and not (is_dq and data_t is not None and data_t not in QUANTIZED_TYPES):  # one finding per cause
        zp_t = facts.elem_type(zp)
        if zp_t is not None and zp_t not in QUANTIZED_TYPES:
            yield ("zero-point-type", f"zero point is {type_name(zp_t)}; TensorRT quantizes to signed INT8",
                   _grid_fix(facts, node))
        zp_value = facts.constant(zp)
        if zp_value is None:
            yield "zero-point", "zero point is not a build-time constant", _grid_fix(facts, node)
        elif np.any(zp_value.astype(np.int64) != 0):
            yield ("zero-point", f"zero point {_values(zp_value)} is not all zero: TensorRT quantizes "
                   "symmetrically", _grid_fix(facts, node))
    yield from _check_scale(node, facts, scale, scale_t, zp, data_t, is_dq)


def _check_scale(node: onnx.NodeProto, facts: GraphFacts, scale: str, scale_t: Optional[int], zp: str,
                 data_t: Optional[int], is_dq: bool) -> Iterator[Finding]:
    if not scale:
        yield "scale", "has no scale input", ""
        return
    if scale_t is not None and scale_t not in Q_INPUT_TYPES:
        yield "scale", f"scale is {type_name(scale_t)}, not a float type", ""
    if not is_dq and scale_t is not None and data_t is not None:
        if facts.opset < 19 and scale_t != TensorProto.FLOAT:
            yield "scale-type", f"scale is {type_name(scale_t)} at opset {facts.opset} (must be FLOAT)", ""
        elif scale_t in (TensorProto.FLOAT16, TensorProto.BFLOAT16) and scale_t != data_t:
            yield ("scale-type", f"scale is {type_name(scale_t)} but the input is {type_name(data_t)}",
                   "give the QuantizeLinear a scale of its input's type (or FLOAT)")
    value = facts.constant(scale)
    if value is None:
        return
    if value.size == 0 or not np.all(value > 0):
        yield "scale", f"scale {_values(value)} is not strictly positive", ""
    if value.ndim > 1:
        yield "scale", f"scale has rank {value.ndim}; INT8 Q/DQ take a scalar or a 1-D scale", ""
    zp_value = facts.constant(zp) if zp else None
    if zp_value is not None and zp_value.size != value.size:
        yield "scale", f"zero point has {zp_value.size} values, the scale {value.size}", ""
    if value.size > 1:
        if not facts.is_constant(node.input[0]):
            yield ("per-channel-weights-only", f"quantizes an activation per channel ({value.size} scales)",
                   "use a per-tensor scheme ('quant_scheme': 'per_tensor_symmetric') for activations")
        shape = facts.shape(node.input[0])
        axis = int(node_attr(node, "axis", 1))
        if shape is not None and -len(shape) <= axis < len(shape) and shape[axis] != value.size:
            yield "scale", f"{value.size} scales for {shape[axis]} channels on axis {axis}", ""


def _check_types(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[Finding]:
    indices = SAME_TYPE_INPUTS.get(node.op_type, ())
    names = list(node.input) if indices is _ALL else [node.input[i] for i in indices if i < len(node.input)]
    typed = [(n, facts.elem_type(n)) for n in names if n]
    if node.op_type in FLOAT_ONLY_INPUTS:
        for name, t in typed:
            if t is not None and t not in FLOAT_TYPES:
                yield ("strong-typing", f"input '{name}' is {type_name(t)}; {node.op_type} computes in float only",
                       "keep this input in float (fold the integer tensor with its DequantizeLinear)")
    floats = {t for _, t in typed if t in FLOAT_TYPES}
    if len(floats) > 1:
        detail = ", ".join(f"'{n}': {type_name(t)}" for n, t in typed if t in FLOAT_TYPES)
        yield ("strong-typing", f"mixes float types ({detail}); a strongly typed network inserts no casts",
               "every input of an fp16 layer must be fp16: a Cast must sit on each float32 input")


def _graph_findings(model: onnx.ModelProto, facts: GraphFacts, version: Optional[str]) -> List[Violation]:
    found: List[Violation] = []
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        found.append(Violation("onnx-valid", "", "", str(exc).strip().splitlines()[0],
                               fix="convert the model with onnx.version_converter instead of changing the number"))
    high = max_opset(version)
    if not MIN_OPSET <= facts.opset <= high:
        found.append(Violation("opset", "", "", f"ai.onnx opset {facts.opset} is outside {MIN_OPSET}..{high} "
                               f"(TensorRT {version or '10.0+'})",
                               fix=f"export with opset_version between {MIN_OPSET} and {high}, or convert with "
                                   "onnx.version_converter.convert_version"))
    for io, kind in [(i, "input") for i in facts.graph_inputs] + [(o, "output") for o in facts.graph_outputs]:
        t = io.type.tensor_type.elem_type
        if t in FLOAT_TYPES and t != TensorProto.FLOAT:
            found.append(Violation("io-float32", "", "", f"graph {kind} '{io.name}' is {type_name(t)}",
                                   fix="end the fp16 region with a Cast to float32 before the graph output"))
    return found


def calibration_violations(config: Mapping[str, Any]) -> List[Violation]:
    """Rule ``zero-point`` on a calibration config: each layer whose quantized input/output grid has
    a non-zero zero point in int8 storage (an affine grid; a symmetric uint grid is exactly the
    int8 one), named with the config keys to change. Exact where the graph check can only say
    which layers a Q/DQ node sits between (a grid derived along a chain shows up on both)."""
    from ...compressor.calibration_record import LayerCalibration
    from ..grid import grid_of  # the grid the plan writes for a tracked range

    found = []
    for layer, entry in config.items():
        if not isinstance(entry, Mapping) or layer.startswith("@"):  # '@tensors', '@placement': not layers
            continue
        calibration = LayerCalibration.from_dict(entry)
        for qtype in ("input", "output"):
            params = calibration.params(qtype)
            grid = grid_of(params)
            if grid is not None and grid.zero_point != 0:
                scheme, dtype = params.scheme, params.dtype
                found.append(Violation(
                    "zero-point", "", "", f"its {qtype} is quantized {scheme}/{dtype} (zero point {grid.zero_point} "
                    "in int8 storage); TensorRT quantizes symmetrically", [(layer, qtype)],
                    f"set 'quant_scheme': 'per_tensor_symmetric' and 'quant_dtype': 'int' for '{qtype}' of "
                    f"'{layer}' (a per-type dict works: {{'{qtype}': 'per_tensor_symmetric'}})"))
    return found


def check_tensorrt_graph(model: onnx.ModelProto, layer_nodes: Optional[Dict[str, Sequence[str]]] = None,
                         tensorrt_version: Optional[str] = None,
                         config: Optional[Mapping[str, Any]] = None) -> List[Violation]:
    """Every rule of :data:`RULES` the graph breaks, node by node.

    ``layer_nodes`` is the plan's ``{config layer: [ONNX node names]}`` (``PrecisionPlan.layer_nodes()``);
    with it each violation names the config layer(s) the node serves. ``tensorrt_version`` (e.g.
    ``'10.13.0'``) selects that release's opset range and operator list; by default the oldest
    supported release, 10.0, so that a passing graph builds on every TensorRT 10/11. With the
    calibration ``config``, the config layers and quant types whose grids have non-zero zero
    points come first (:func:`calibration_violations`), before the Q/DQ nodes they produce.
    """
    facts = GraphFacts(model)
    locator = LayerLocator(facts, layer_nodes)
    violations = _graph_findings(model, facts, tensorrt_version)
    ops = supported_ops(tensorrt_version)
    for node in facts.nodes:
        findings: List[Finding] = []
        if node.domain not in DEFAULT_DOMAINS:
            findings.append(("supported-op", f"custom domain '{node.domain}' needs a TensorRT plugin, which mixq "
                             "does not provide", "exclude the layer that exports this operator"))
        elif node.op_type not in ops:
            findings.append(("supported-op", f"{node.op_type} is not in the parser's supported operators",
                             "keep the layer out of the model or replace the operation"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            findings.extend(_check_qdq(node, facts))
        findings.extend(_check_types(node, facts))
        if findings:
            roles = locator.roles(node)
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and facts.is_constant(node.input[0]):
                roles = [(layer, "weight") for layer, _ in roles]
            for rule, message, fix in findings:
                violations.append(Violation(rule, node.name, node.op_type, message, roles, fix, locator.known))
    return (calibration_violations(config) if config else []) + violations


def assert_tensorrt_conforms(model: onnx.ModelProto, layer_nodes: Optional[Dict[str, Sequence[str]]] = None,
                             tensorrt_version: Optional[str] = None,
                             config: Optional[Mapping[str, Any]] = None) -> None:
    """Raise :class:`TensorRTConformanceError` listing every violation (see :func:`check_tensorrt_graph`)."""
    violations = check_tensorrt_graph(model, layer_nodes, tensorrt_version, config)
    if violations:
        raise TensorRTConformanceError(violations)
