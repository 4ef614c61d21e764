"""The TensorRT refinement of the precision-annotated graph, then the conformance check.

The shared annotated graph is written for every backend; TensorRT needs three exact rewrites
before its parser sees it (none changes a single computed value):

1. the int32 bias ``DequantizeLinear`` of integer Conv/Gemm nodes becomes a float bias
   (``codes * scale``, :func:`mixq.speedup.onnx_qdq.dequantize_bias`): TensorRT dequantizes only
   INT8/FP8/INT4/FP4 and adds biases in float (NvInfer.h ``IDequantizeLayer``; TensorRT Model
   Optimizer's export keeps biases in float too);
2. zero points become zero where that is exact: a UINT8 grid with zero point 128 is the INT8
   grid with zero point 0, and integer weights ``(q - z) * s`` are stored as ``q' = q - z``
   whenever every ``q - z`` fits in int8. Anything else (an affine activation grid) is refused
   by the checker, naming the layer and the config key to change;
3. the ai.onnx opset is moved into the parser's range with ``onnx.version_converter`` (a real
   conversion, operator by operator), when it is outside.

:func:`prepare_for_tensorrt` then runs :func:`~.tensorrt_rules.assert_tensorrt_conforms`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..onnx_qdq import dequantize_bias
from .tensorrt_graph import GraphFacts, default_opset, node_attr
from .tensorrt_rules import MIN_OPSET, assert_tensorrt_conforms, max_opset

logger = logging.getLogger(__name__)

_INT8_MIN, _INT8_MAX = -128, 127
_Q_DQ = ("QuantizeLinear", "DequantizeLinear")


def fold_int32_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without int32 ``DequantizeLinear`` nodes on initializers (biases folded to float)."""
    inits = {t.name: t for t in model.graph.initializer}
    if not any(n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT32 for n in model.graph.node):
        return model
    folded = dequantize_bias(model)
    logger.debug("folded %d int32 bias DequantizeLinear nodes into float biases",
                 len(model.graph.node) - len(folded.graph.node))
    return folded


class _Rewriter:
    """Zero-point conversions on a copy of the model, with fresh initializer names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.facts = GraphFacts(self.model)
        self.used = {t.name for t in self.model.graph.initializer} | {o for n in self.model.graph.node
                                                                     for o in list(n.input) + list(n.output)}
        self.converted: List[str] = []

    def _new(self, base: str, value: np.ndarray) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def _zp(self, node: onnx.NodeProto) -> Optional[np.ndarray]:
        return self.facts.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    def weights(self) -> None:
        """``DequantizeLinear`` on constant integer codes: fold the zero point into the codes."""
        for node in self.model.graph.node:
            if node.op_type != "DequantizeLinear" or not self.facts.is_constant(node.input[0]):
                continue
            codes, zp = self.facts.constant(node.input[0]), self._zp(node)
            if zp is None or codes is None or codes.dtype not in (np.int8, np.uint8):
                continue
            if codes.dtype == np.int8 and not np.any(zp):
                continue
            shifted = codes.astype(np.int32) - _broadcast(zp.astype(np.int32), codes.ndim,
                                                          int(node_attr(node, "axis", 1)))
            if shifted.min(initial=0) < _INT8_MIN or shifted.max(initial=0) > _INT8_MAX:
                continue  # not exact in int8: the checker reports it with the layer
            node.input[0] = self._new(f"{node.input[0]}_int8", shifted.astype(np.int8))
            node.input[2] = self._new(f"{node.input[2]}_int8", np.zeros(zp.shape, np.int8))
            self.converted.append(node.name)

    def activations(self) -> None:
        """A QuantizeLinear with UINT8 zero points all 128 and every DequantizeLinear reading it:
        the same grid as INT8 with zero point 0."""
        for node in self.model.graph.node:
            if node.op_type != "QuantizeLinear" or self.facts.is_constant(node.input[0]):
                continue
            readers = self.facts.consumers.get(node.output[0], [])
            group = [node] + readers
            if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
                continue
            zps = [self._zp(n) for n in group]
            if any(z is None or z.dtype != np.uint8 or np.any(z != 128) for z in zps):
                continue
            for member, zp in zip(group, zps):
                member.input[2] = self._new(f"{member.input[2]}_int8", np.zeros(zp.shape, np.int8))
                self.converted.append(member.name)


def _broadcast(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return values.reshape(shape)


def convert_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every exactly convertible non-zero zero point made zero (see module doc)."""
    rewriter = _Rewriter(model)
    rewriter.weights()
    rewriter.activations()
    if not rewriter.converted:
        return model
    logger.info("TensorRT: re-encoded %d Q/DQ nodes with zero point 0 (exact)", len(rewriter.converted))
    _prune(rewriter.model)
    return rewriter.model


def _prune(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def fit_opset(model: onnx.ModelProto, tensorrt_version: Optional[str] = None) -> onnx.ModelProto:
    """The model converted (``onnx.version_converter``) into the opsets the parser of
    ``tensorrt_version`` reads, if it is outside; unchanged otherwise. A failed conversion is
    logged and left to the checker's ``opset`` rule."""
    current, high = default_opset(model), max_opset(tensorrt_version)
    target = MIN_OPSET if current < MIN_OPSET else high if current > high else current
    if target == current:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors per unsupported adapter
        logger.warning("could not convert the model from opset %d to %d: %s", current, target, exc)
        return model
    logger.info("TensorRT: converted the ONNX model from opset %d to %d", current, target)
    return converted


def prepare_for_tensorrt(model: onnx.ModelProto, layer_nodes: Optional[Dict[str, Sequence[str]]] = None,
                         tensorrt_version: Optional[str] = None,
                         config: Optional[Mapping[str, Any]] = None) -> onnx.ModelProto:
    """The graph TensorRT's parser gets: biases in float, zero points zero, opset in range; raises
    :class:`~.tensorrt_rules.TensorRTConformanceError` when a rule TensorRT documents is still
    broken, naming config layers through ``layer_nodes`` (and, with the calibration ``config``,
    the exact layer and quant type of each asymmetric grid). The input is not modified."""
    prepared = fit_opset(convert_zero_points(fold_int32_biases(model)), tensorrt_version)
    assert_tensorrt_conforms(prepared, layer_nodes, tensorrt_version, config)
    return prepared

