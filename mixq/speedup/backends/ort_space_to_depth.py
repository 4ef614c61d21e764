"""Space-to-depth rewrite of a few-channel integer conv followed by a 2x2 max-pool (ONNX Runtime).

ONNX Runtime's integer convolution is slow when the input has fewer than 4 channels (a
grey-scale or RGB stem): each output pixel gathers only 1-3 bytes per tap, and the fast
symmetric kernels need the input channel count to be a multiple of 4. When such a conv
(stride 1, no padding, group 1) is followed, on the same quantization grid, by a 2x2 stride-2
max-pool, the pair is rewritten exactly:

* ``SpaceToDepth(2)`` on the uint8 input gives 4x the channels at half the resolution;
* one conv on it computes the four output phases (even/odd row x even/odd column) of the
  original conv at once: its weights place the original taps at the positions each phase
  reads and zeros elsewhere (``4*Cout`` outputs, kernel ``k//2 + 1``);
* the max-pool becomes the element-wise ``Max`` of the four phases (``Split`` + ``Max`` on the
  uint8 codes; quantization is monotone, so it commutes with the max).

Every integer product and sum is the same as before, so the codes are bit-identical; only
the kernel ONNX Runtime picks changes. The conv keeps its node name (the precision report
follows it) and the ``Max`` takes the pool's name.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, shape_inference

from .onnx_graph_index import GraphIndex, node_attr

MAX_INPUT_CHANNELS = 3  # from 4 channels on, ONNX Runtime's symmetric integer conv kernels apply as they are


def _is_plain_2x2_pool(pool: onnx.NodeProto) -> bool:
    return (pool.op_type == "MaxPool" and len(pool.output) == 1 and list(node_attr(pool, "kernel_shape", [])) == [2, 2]
            and list(node_attr(pool, "strides", [1, 1])) == [2, 2] and not any(node_attr(pool, "pads", [0] * 4))
            and list(node_attr(pool, "dilations", [1, 1])) == [1, 1] and node_attr(pool, "ceil_mode", 0) == 0
            and node_attr(pool, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def _is_plain_conv(conv: onnx.NodeProto) -> bool:
    return (conv.op_type == "Conv" and node_attr(conv, "group", 1) == 1 and list(node_attr(conv, "strides", [1, 1])) == [1, 1]
            and list(node_attr(conv, "dilations", [1, 1])) == [1, 1] and not any(node_attr(conv, "pads", [0] * 4))
            and node_attr(conv, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def phase_weights(weight: np.ndarray) -> np.ndarray:
    """``[Cout, Cin, kh, kw]`` -> ``[4*Cout, 4*Cin, kh//2+1, kw//2+1]``: output channel
    ``(a*2+b)*Cout + o`` is the original filter ``o`` evaluated at output phase (row ``a``,
    column ``b``) on a ``SpaceToDepth(2)`` input (channel ``(r*2+s)*Cin + c``)."""
    cout, cin, kh, kw = weight.shape
    out = np.zeros((4 * cout, 4 * cin, kh // 2 + 1, kw // 2 + 1), dtype=weight.dtype)
    for a in range(2):
        for b in range(2):
            for u in range(kh):
                for v in range(kw):
                    (p, r), (q, s) = divmod(a + u, 2), divmod(b + v, 2)
                    rows = slice((a * 2 + b) * cout, (a * 2 + b + 1) * cout)
                    cols = slice((r * 2 + s) * cin, (r * 2 + s + 1) * cin)
                    out[rows, cols, p, q] = weight[:, :, u, v]
    return out


def _static_shapes(model: onnx.ModelProto) -> Dict[str, List[Optional[int]]]:
    inferred = shape_inference.infer_shapes(model)
    return {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in list(inferred.graph.input) + list(inferred.graph.value_info)}


def _grid(g: GraphIndex, node: onnx.NodeProto) -> Tuple:
    return tuple(np.asarray(g.const(n)).tolist() for n in node.input[1:3])


def _match(g: GraphIndex, shapes: Dict[str, List[Optional[int]]], conv: onnx.NodeProto):
    """The chain DQ(x) -> conv(DQ(w), DQ(b)) -> Q -> DQ -> MaxPool -> Q, or None."""
    if not _is_plain_conv(conv) or len(conv.input) < 2:
        return None
    dq_x, dq_w = g.producer.get(conv.input[0]), g.producer.get(conv.input[1])
    dq_b = g.producer.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if dq_x is None or dq_x.op_type != "DequantizeLinear" or dq_w is None or dq_w.op_type != "DequantizeLinear":
        return None
    weight = g.const(dq_w.input[0])
    if weight is None or weight.ndim != 4 or weight.dtype != np.int8 or weight.shape[1] > MAX_INPUT_CHANNELS:
        return None
    w_zp = g.const(dq_w.input[2]) if len(dq_w.input) > 2 else np.zeros(1, np.int8)
    if w_zp is None or np.any(w_zp != 0):  # the zeros placed between taps must dequantize to 0
        return None
    if dq_b is not None and (dq_b.op_type != "DequantizeLinear" or g.const(dq_b.input[0]) is None):
        return None
    shape = shapes.get(conv.input[0])
    if not shape or len(shape) != 4 or shape[2] is None or shape[3] is None:
        return None
    kh, kw = weight.shape[2:]
    if shape[2] % 2 or shape[3] % 2 or (shape[2] - kh + 1) % 2 or (shape[3] - kw + 1) % 2:
        return None
    q_y = g.only_reader(conv.output[0], "QuantizeLinear")
    dq_y = g.only_reader(q_y.output[0], "DequantizeLinear") if q_y is not None else None
    pool = g.only_reader(dq_y.output[0], "MaxPool") if dq_y is not None else None
    q_p = g.only_reader(pool.output[0], "QuantizeLinear") if pool is not None else None
    if q_p is None or not _is_plain_2x2_pool(pool) or not (_grid(g, q_y) == _grid(g, dq_y) == _grid(g, q_p)):
        return None
    if g.only_reader(dq_x.output[0], "Conv") is None:
        return None
    return dq_x, dq_w, dq_b, q_y, dq_y, pool, q_p


def _tiled(g: GraphIndex, name: str, suffix: str) -> str:
    value = g.const(name)
    if value is None or value.ndim == 0 or value.size == 1:
        return name
    return g.add_const(f"{name}{suffix}", np.tile(value, 4))


def fuse_conv_pool_space_to_depth(model: onnx.ModelProto) -> List[str]:
    """Rewrite, in place, every matching conv + 2x2 max-pool pair (see the module docstring);
    return the names of the rewritten convs."""
    g = GraphIndex(model)
    shapes = _static_shapes(model)
    rewritten, drop = [], set()
    for conv in list(model.graph.node):
        found = _match(g, shapes, conv)
        if found is None:
            continue
        dq_x, dq_w, dq_b, q_y, dq_y, pool, q_p = found
        base, cout = conv.name or conv.output[0], g.const(dq_w.input[0]).shape[0]
        s2d = helper.make_node("SpaceToDepth", [dq_x.input[0]], [f"{base}/s2d"], name=f"{base}/SpaceToDepth",
                               blocksize=2)
        dq_x.input[0] = s2d.output[0]
        dq_w.input[0] = g.add_const(f"{dq_w.input[0]}/phases", phase_weights(g.const(dq_w.input[0])))
        for i in (1, 2):
            if len(dq_w.input) > i and dq_w.input[i]:
                dq_w.input[i] = _tiled(g, dq_w.input[i], "/phases")
        if dq_b is not None:
            for i in range(len(dq_b.input)):
                if dq_b.input[i]:
                    dq_b.input[i] = _tiled(g, dq_b.input[i], "/phases")
        del conv.attribute[:]
        conv.attribute.append(helper.make_attribute("kernel_shape", list(g.const(dq_w.input[0]).shape[2:])))
        sizes = g.add_const(f"{base}/phase_sizes", np.full(4, cout, np.int64))
        phases = [f"{base}/phase{i}" for i in range(4)]
        split = helper.make_node("Split", [q_y.output[0], sizes], phases, name=f"{base}/Split", axis=1)
        maximum = helper.make_node("Max", phases, [q_p.output[0]], name=pool.name)
        drop.update({id(dq_y), id(pool), id(q_p)})
        model.graph.node.extend([s2d, split, maximum])
        rewritten.append(conv.name)
    if rewritten:
        kept = [n for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(kept)  # the caller restores topological order
    return rewritten
