"""Float attention cores -> ONNX Runtime's fused ``com.microsoft.MultiHeadAttention`` kernel.

PyTorch exports ``scaled_dot_product_attention`` (Hugging Face BERT/ViT, ``nn.MultiheadAttention``)
as a dozen small ops per block: per-head Reshape/Transpose of Q, K and V, two scaling Muls,
Q·Kᵀ, the additive mask, Softmax, a NaN guard (IsNaN + Where, for rows whose keys are all
masked), softmax·V and the Transpose/Reshape back. ONNX Runtime's own transformer optimizer does
not recognise this form, so its quantizers' graphs run every one of those ops on tensors of
batch x heads x sequence². This pass replaces each such core (the Q/K/V/output projections are
untouched, whatever their precision) with one MultiHeadAttention node computing the same
function:

* scale = the product of the two scaling constants;
* the mask ``Where(keep, 0, -inf)`` becomes ``Where(keep, 0, lowest float32)`` (finite, so the
  kernel never computes -inf - (-inf)) and the output of a query row whose keys are all masked is
  multiplied by 0, which is what the NaN guard made of it; every other row is unchanged.

Only cores made entirely of float ops match: an attention product the config quantizes (Q/DQ
or an integer kernel in the chain) keeps its own nodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_graph_index import GraphIndex, default_opset, node_attr

logger = logging.getLogger(__name__)

FUSED_KEY = "mixq.fused_attention"  # metadata: graph nodes now run inside a float MultiHeadAttention
_LOWEST = float(np.finfo(np.float32).min)


@dataclass
class _Core:
    """One matched attention core: its projections' outputs and the nodes it replaces."""
    query: str
    key: str
    value: str
    output: str
    heads: int
    scale: float
    bias: str = ""
    keep_mask: str = ""  # bool mask of a NaN-guarded core: rows with no kept key output 0
    nodes: List[onnx.NodeProto] = field(default_factory=list)


class _Graph(GraphIndex):
    """:class:`GraphIndex` plus ``Constant`` node values and the inferred shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.consts = {name: numpy_helper.to_array(t) for name, t in self.inits.items()}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        g = model.graph
        self.shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                                 for d in vi.type.tensor_type.shape.dim]
                       for vi in list(g.value_info) + list(g.input) + list(g.output)}

    def made_by(self, tensor: str, op_type: str) -> Optional[onnx.NodeProto]:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def compute_readers(self, tensor: str) -> List[onnx.NodeProto]:
        """Readers of ``tensor`` other than Shape nodes (the exporter's shape arithmetic)."""
        return [n for n in self.consumers[tensor] if n.op_type != "Shape"]

    def scalar(self, tensor: str) -> Optional[float]:
        value = self.consts.get(tensor)
        return float(value.reshape(())) if value is not None and value.size == 1 else None


def _perm(node: onnx.NodeProto) -> List[int]:
    return list(node_attr(node, "perm", []))


def _unscaled(g: _Graph, tensor: str, nodes: List[onnx.NodeProto]) -> Tuple[str, float]:
    """``tensor`` without a Mul by a constant before it, and that constant (1 without one)."""
    mul = g.made_by(tensor, "Mul")
    if mul is not None:
        for i, j in ((0, 1), (1, 0)):
            c = g.scalar(mul.input[j])
            if c is not None:
                nodes.append(mul)
                return mul.input[i], c
    return tensor, 1.0


def _heads_of(g: _Graph, transpose: onnx.NodeProto, perm: List[int], nodes: List[onnx.NodeProto]) -> Optional[Tuple[str, int]]:
    """(projection output, heads) when ``transpose`` (with ``perm``) splits heads off a Reshape of it."""
    if _perm(transpose) != perm:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    shape = g.shapes.get(reshape.output[0]) if reshape is not None else None
    if reshape is None or not shape or len(shape) != 4:
        return None
    heads, head_size = shape[2], shape[3]
    width = (g.shapes.get(reshape.input[0]) or [None])[-1]
    if heads is None and head_size and width and width % head_size == 0:
        heads = width // head_size  # (batch, sequence, heads * head_size) split into heads
    if not heads:
        return None
    nodes += [transpose, reshape]
    return reshape.input[0], int(heads)


def _mask_of(g: _Graph, bias: str) -> Optional[str]:
    """The bool tensor of ``bias = Where(keep, 0, -inf)``, else None."""
    where = g.made_by(bias, "Where")
    if where is None or g.scalar(where.input[1]) != 0.0 or g.scalar(where.input[2]) != -np.inf:
        return None
    return where.input[0]


def _match(g: _Graph, softmax: onnx.NodeProto) -> Optional[_Core]:
    nodes: List[onnx.NodeProto] = [softmax]
    if node_attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores, bias = softmax.input[0], ""
    add = g.made_by(scores, "Add")
    if add is not None:
        nodes.append(add)
        scores, bias = add.input[0], add.input[1]
    qk = g.made_by(scores, "MatMul")
    if qk is None:
        return None
    nodes.append(qk)
    q, q_scale = _unscaled(g, qk.input[0], nodes)
    k, k_scale = _unscaled(g, qk.input[1], nodes)
    q_t, k_t = g.made_by(q, "Transpose"), g.made_by(k, "Transpose")
    if q_t is None or k_t is None:
        return None
    query, key = _heads_of(g, q_t, [0, 2, 1, 3], nodes), _heads_of(g, k_t, [0, 2, 3, 1], nodes)
    if query is None or key is None or query[1] != key[1]:
        return None
    probs, keep_mask = softmax.output[0], ""
    readers = g.compute_readers(probs)
    if {n.op_type for n in readers} == {"IsNaN", "Where"} and len(readers) == 2:
        isnan = next(n for n in readers if n.op_type == "IsNaN")
        guard = next(n for n in readers if n.op_type == "Where")
        if list(guard.input) != [isnan.output[0], guard.input[1], probs] or g.scalar(guard.input[1]) != 0.0:
            return None
        if bias:
            keep_mask = _mask_of(g, bias)
            if keep_mask is None:
                return None
        nodes += [isnan, guard]
        probs, readers = guard.output[0], g.compute_readers(guard.output[0])
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != probs:
        return None
    pv = readers[0]
    nodes.append(pv)
    v_t = g.made_by(pv.input[1], "Transpose")
    value = _heads_of(g, v_t, [0, 2, 1, 3], nodes) if v_t is not None else None
    if value is None or value[1] != query[1]:
        return None
    out = g.compute_readers(pv.output[0])
    if len(out) == 1 and out[0].op_type == "Reshape":  # a reshape to the same 4-D shape first
        nodes.append(out[0])
        out = g.compute_readers(out[0].output[0])
    if len(out) != 1 or out[0].op_type != "Transpose" or _perm(out[0]) != [0, 2, 1, 3]:
        return None
    nodes.append(out[0])
    merge = g.compute_readers(out[0].output[0])
    if len(merge) != 1 or merge[0].op_type != "Reshape" or len(g.shapes.get(merge[0].output[0]) or []) != 3:
        return None
    nodes.append(merge[0])
    inner = {o for n in nodes for o in n.output} - {merge[0].output[0]}
    own = {id(n) for n in nodes}
    if any(id(r) not in own and r.op_type != "Shape" for t in inner for r in g.consumers[t]) or inner & g.outputs:
        return None  # an intermediate is read elsewhere: leave the core as it is
    return _Core(query[0], key[0], value[0], merge[0].output[0], query[1], q_scale * k_scale, bias,
                 keep_mask, nodes)


def fuse_attention(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, List[str]]:
    """``model`` with every float attention core as a MultiHeadAttention node, and the names of
    the nodes that were replaced. Needs inferred shapes (the head count is read from them)."""
    g = _Graph(model)
    cores = [c for c in (_match(g, n) for n in model.graph.node if n.op_type == "Softmax") if c is not None]
    opset = default_opset(model)
    if opset < 15:
        cores = [c for c in cores if not c.bias]  # the bias's shape is spelt with Shape(start, end)
    if not cores:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    removed: Set[int] = {id(n) for c in cores for n in c.nodes}
    new_nodes: Dict[str, List[onnx.NodeProto]] = {}  # by the core's output: emitted where its last node was
    for index, core in enumerate(cores):
        stem = f"/mixq/attention_{index}"
        emitted: List[onnx.NodeProto] = []
        bias, result = "", core.output
        if core.bias:
            bias, row_has_key, nodes = _bias_nodes(core, stem, out, opset)
            emitted += nodes
            if core.keep_mask:
                result = f"{stem}/output"
        emitted.append(helper.make_node(
            "MultiHeadAttention", [core.query, core.key, core.value, "", "", bias], [result],
            name=f"{stem}/MultiHeadAttention", domain="com.microsoft", num_heads=core.heads, scale=core.scale))
        if core.keep_mask:
            emitted.append(helper.make_node("Mul", [result, row_has_key], [core.output], name=f"{stem}/ZeroEmptyRows"))
        new_nodes[core.output] = emitted
    kept: List[onnx.NodeProto] = []
    for node in model.graph.node:
        if id(node) in removed:
            for o in node.output:
                kept += new_nodes.pop(o, [])
            continue
        kept.append(node)
    kept = _without_dead_nodes(kept, {o.name for o in model.graph.output})
    del out.graph.node[:]
    out.graph.node.extend(kept)
    live = {o for n in kept for o in n.output}
    alive = [vi for vi in out.graph.value_info if vi.name in live]
    del out.graph.value_info[:]
    out.graph.value_info.extend(alive)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    names = [n.name for c in cores for n in c.nodes]
    logger.info("fused %d attention core(s) into MultiHeadAttention", len(cores))
    return out, names


def _bias_nodes(core: _Core, stem: str, model: onnx.ModelProto, opset: int) -> Tuple[str, str, List[onnx.NodeProto]]:
    """The kernel's attention bias, (batch, heads or 1, query, key), and for a NaN-guarded core
    ``row_has_key`` (batch, query, 1): 1 where the query row keeps a key, else 0.

    A guarded core's ``Where(keep, 0, -inf)`` is rebuilt with the lowest finite float32, so a
    row with no key gives finite values that ``row_has_key`` zeroes (as the guard did)."""
    names = {p: f"{stem}/{p}" for p in ("zero", "lowest", "bias_source", "q_shape_0", "q_shape_1", "k_shape_1",
                                          "one", "bias_shape", "bias", "keep_float", "any_key", "row_has_key")}
    init = model.graph.initializer
    init.extend([numpy_helper.from_array(np.array([1], np.int64), names["one"])])
    nodes: List[onnx.NodeProto] = []
    source = core.bias
    if core.keep_mask:
        init.extend([numpy_helper.from_array(np.array(0.0, np.float32), names["zero"]),
                     numpy_helper.from_array(np.array(_LOWEST, np.float32), names["lowest"])])
        nodes.append(helper.make_node("Where", [core.keep_mask, names["zero"], names["lowest"]],
                                      [names["bias_source"]], name=f"{stem}/MaskBias"))
        source = names["bias_source"]
    nodes += [helper.make_node("Shape", [core.query], [names["q_shape_0"]], start=0, end=1, name=f"{stem}/Batch"),
              helper.make_node("Shape", [core.query], [names["q_shape_1"]], start=1, end=2, name=f"{stem}/QueryLength"),
              helper.make_node("Shape", [core.key], [names["k_shape_1"]], start=1, end=2, name=f"{stem}/KeyLength"),
              helper.make_node("Concat", [names["q_shape_0"], names["one"], names["q_shape_1"], names["k_shape_1"]],
                               [names["bias_shape"]], axis=0, name=f"{stem}/BiasShape"),
              helper.make_node("Expand", [source, names["bias_shape"]], [names["bias"]], name=f"{stem}/Bias")]
    if not core.keep_mask:
        return names["bias"], "", nodes
    def reduce(op: str, src: str, dst: str, axis: int, keepdims: int) -> onnx.NodeProto:
        if opset < 18:  # axes became an input in opset 18
            return helper.make_node(op, [src], [dst], axes=[axis], keepdims=keepdims, name=f"{stem}/{op}")
        axes = f"{stem}/{op}_axes"
        init.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        return helper.make_node(op, [src, axes], [dst], keepdims=keepdims, name=f"{stem}/{op}")
    nodes += [helper.make_node("Cast", [core.keep_mask], [names["keep_float"]], to=TensorProto.FLOAT,
                               name=f"{stem}/MaskFloat"),
              reduce("ReduceMax", names["keep_float"], names["any_key"], -1, 1),   # (batch, heads or 1, query, 1)
              reduce("ReduceMin", names["any_key"], names["row_has_key"], 1, 0)]   # (batch, query, 1)
    return names["bias"], names["row_has_key"], nodes


def _without_dead_nodes(nodes: List[onnx.NodeProto], outputs: Set[str]) -> List[onnx.NodeProto]:
    """``nodes`` less those whose outputs nobody reads (the removed reshapes' shape arithmetic)."""
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return alive
        nodes = alive
