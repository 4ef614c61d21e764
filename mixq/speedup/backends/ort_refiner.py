"""The annotated graph refined for ONNX Runtime's CPU integer kernels, computing the same values.

ONNX Runtime's x86 integer kernels want u8 activations, s8 symmetric weights and int32 bias,
with a QuantizeLinear after every Conv/Gemm/MatMul. The backend refines the annotated graph
without changing what it computes:

* activation Q/DQ pairs are re-encoded from int8 to uint8 (zero point + 128: the same grid);
* the float Clip that narrows a 2-7 bit grid (DQ -> Clip -> Q) becomes a Clip of the uint8 codes;
* a ReLU (or a Clip acting as one) between a DQ and a Q on the same grid with zero point 0
  (affine uint8 ranges starting at 0) is dropped: the codes are already non-negative, the
  integer kernel before it saturates for it;
* a ReLU followed by a MaxPool on the same grid moves after the pool (they commute);
* a ReLU/Clip between an op and a Q whose grid does not start at the activation's floor (a
  symmetric range) moves after the Q as a Clip of the uint8 codes (exact: Q is monotone), so the
  op before it still ends in a Q and runs as an integer kernel;
* a conv with fewer than 4 input channels followed by a 2x2 max-pool is rewritten through
  SpaceToDepth, conv output channels are zero-padded to a multiple of 16 where the next
  layer absorbs them and other input channels to a multiple of 4 (a zero-point Pad), so ONNX
  Runtime's fast integer conv kernels run (bit-identical codes);
* any other ReLU between a DQ and a Q becomes LeakyRelu(alpha=0), which ONNX Runtime runs as
  an integer lookup table (QLinearLeakyRelu) instead of in float;
* a HardSigmoid quantized on [0, 1] becomes an Add whose uint8 output saturates (QLinearAdd,
  :mod:`.ort_hardsigmoid`), a BatchNorm between quantized tensors a depthwise 1x1 conv
  (QLinearConv, :mod:`.ort_channel_affine`);
* fp16 layers run in fp32 (the CPU provider has no fp16 kernels): Casts become Identity and
  fp16 weights are widened (exactly).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...placement.onnx_graph import OnnxGraph, prune_initializers
from ...placement.policy import spatial_mean
from .ort_channel_padding import pad_conv_input_channels, pad_conv_output_channels
from .ort_channel_affine import batchnorm_as_depthwise_conv
from .ort_hardsigmoid import hardsigmoid_as_saturating_add
from .ort_space_to_depth import fuse_conv_pool_space_to_depth

ABSORBED_KEY = "mixq.onnxruntime.absorbed_relus"


class _Refiner:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        graph = self.model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.constants = dict(self.inits)
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = n.attribute[0].t
        self.graph_outputs = {o.name for o in graph.output}
        self.u8_zero_points: Dict[str, str] = {}
        self.absorbed: set = set()
        self._index()

    def _index(self) -> None:
        graph = self.model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)

    def _u8(self, zp_name: str) -> str:
        if zp_name not in self.u8_zero_points:
            t = self.inits[zp_name]
            value = numpy_helper.to_array(t).astype(np.int16) + 128
            name = f"{zp_name}.u8"
            tensor = numpy_helper.from_array(value.astype(np.uint8), name)
            self.model.graph.initializer.append(tensor)
            self.inits[name] = tensor
            self.u8_zero_points[zp_name] = name
        return self.u8_zero_points[zp_name]

    def _is_int8(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == TensorProto.INT8

    def activations_to_u8(self) -> None:
        for node in self.model.graph.node:
            activation = node.op_type == "QuantizeLinear" or (
                node.op_type == "DequantizeLinear" and node.input[0] not in self.inits)
            if activation and len(node.input) > 2 and self._is_int8(node.input[2]):
                node.input[2] = self._u8(node.input[2])

    def _grid(self, node: onnx.NodeProto):
        scale = float(numpy_helper.to_array(self.inits[node.input[1]]))
        zp = int(numpy_helper.to_array(self.inits[node.input[2]]))
        return scale, zp

    def _relu_between(self, node: onnx.NodeProto, zp: int, scale: float) -> bool:
        """True for a Relu, or a Clip acting as one on a u8 grid (lower bound 0, upper beyond it)."""
        if node.op_type == "Relu":
            return True
        return node.op_type == "Clip" and self._clip_is_relu(node, scale, zp)

    def _q_after(self, node: onnx.NodeProto):
        """The QuantizeLinear that alone reads ``node``'s output (not a graph output), or None."""
        readers = self.consumers.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or node.output[0] in self.graph_outputs:
            return None
        return readers[0]

    def _dq_op_q(self, node: onnx.NodeProto):
        """(DQ before, Q after) when ``node`` sits alone between a DequantizeLinear and a QuantizeLinear."""
        dq, q = self.producer.get(node.input[0]), self._q_after(node)
        if dq is None or dq.op_type != "DequantizeLinear" or q is None:
            return None
        return dq, q

    def clip_codes(self) -> None:
        """DQ -> Clip -> Q on one grid (a 2-7 bit grid stored in 8 bits, a ReLU6) becomes a Clip
        of the uint8 codes: the same values, and the integer kernels around it stay fused."""
        for clip in list(self.model.graph.node):
            if clip.op_type != "Clip" or len(clip.input) != 3:
                continue
            pair = self._dq_op_q(clip)
            if pair is None or any(name not in self.constants for name in clip.input[1:]):
                continue
            dq, q = pair
            scale, zp = self._grid(dq)
            if self._grid(q) != (scale, zp) or dq.input[0] in self.inits:
                continue
            # Q(clip(DQ(c), lo, hi)) == clamp(c, Q(lo), Q(hi)) for every code c: Q is monotone
            codes = [_quantize_u8(numpy_helper.to_array(self.constants[n]), scale, zp) for n in clip.input[1:]]
            bounds = [self._const_u8(f"{q.output[0]}/code_{side}", c) for side, c in zip(("min", "max"), codes)]
            clip.input[0], clip.input[1], clip.input[2] = dq.input[0], bounds[0], bounds[1]
            clip.output[0] = q.output[0]
            q.output[0] = f"{q.output[0]}/unused"
        self._prune()

    def _const_u8(self, name: str, value: int) -> str:
        tensor = numpy_helper.from_array(np.array(value, dtype=np.uint8), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = self.constants[name] = tensor
        return name

    def drop_identity_requantization(self) -> None:
        """Bypass DQ -> [ReLU] -> Q chains that give back the very codes they read: equal
        grids, and a ReLU only where the grid has no negative values (u8 zero point 0)."""
        for node in list(self.model.graph.node):
            if node.op_type not in ("Relu", "Clip"):
                continue
            pair = self._dq_op_q(node)
            if pair is None:
                continue
            dq, q = pair
            grid = self._grid(dq)
            if grid != self._grid(q) or grid[1] != 0 or not self._relu_between(node, grid[1], grid[0]):
                continue
            for reader in self.consumers.get(q.output[0], []):
                for i, name in enumerate(reader.input):
                    if name == q.output[0]:
                        reader.input[i] = dq.input[0]
            self.absorbed.add(node.name)
        self._prune()

    def relu_into_quantize(self) -> None:
        """Op -> ReLU/Clip -> Q becomes Op -> Q where the Q's uint8 grid clips there already (zero
        point 0, the Clip's top at or above the grid's): what ONNX Runtime's ReluQuantFusion /
        ClipQuantFusion do, done here so the conv patterns below (SpaceToDepth) see it."""
        for node in list(self.model.graph.node):
            q = self._q_after(node) if node.op_type in ("Relu", "Clip") else None
            if q is None or len(q.input) < 3 or q.input[1] not in self.inits or self.inits.get(q.input[2]) is None \
                    or self.inits[q.input[2]].data_type != TensorProto.UINT8:
                continue
            scale, zp = self._grid(q)
            if zp != 0 or not self._relu_between(node, zp, scale):
                continue
            q.input[0] = node.input[0]
            self.absorbed.add(node.name)
        self._prune()

    def quantize_before_activation(self) -> None:
        """Op -> ReLU/Clip -> Q whose grid does not start at the activation's floor (a symmetric
        int8 range after a ReLU) becomes Op -> Q -> Clip of the uint8 codes: Q is monotone and
        maps 0 (and the Clip's bounds) to codes, so Q(clip(y, lo, hi)) == clip(Q(y), Q(lo), Q(hi))
        for every y. The op before then ends in a Q, as ONNX Runtime's integer kernels need
        (QLinearConv, QLinearAdd), instead of running in float for the activation's sake."""
        changed = False
        for act in list(self.model.graph.node):
            q = self._q_after(act) if act.op_type in ("Relu", "Clip") else None
            producer = self.producer.get(act.input[0]) if q is not None else None
            if producer is None or producer.op_type == "DequantizeLinear" or q.input[1] not in self.inits \
                    or len(q.input) < 3 or self.inits.get(q.input[2]) is None \
                    or self.inits[q.input[2]].data_type != TensorProto.UINT8:
                continue
            bounds = (0.0, None) if act.op_type == "Relu" else self._constant_bounds(act)
            if bounds is None:
                continue
            scale, zp = self._grid(q)
            codes = [0 if bounds[0] is None else _quantize_u8(bounds[0], scale, zp),
                     255 if bounds[1] is None else _quantize_u8(bounds[1], scale, zp)]
            out = q.output[0]  # unique, unlike node names (which may be empty)
            limits = [self._const_u8(f"{out}/code_{side}", c) for side, c in zip(("min", "max"), codes)]
            q.input[0], q.output[0] = act.input[0], f"{out}/before_{act.op_type}"
            self.model.graph.node.append(helper.make_node("Clip", [q.output[0]] + limits, [out], act.name))
            self.absorbed.discard(act.name)
            changed = True
        if changed:
            self._prune()
            self._toposort()

    def _prune(self) -> None:
        graph = self.model.graph
        while True:
            used = {i for n in graph.node for i in n.input} | self.graph_outputs
            keep = [n for n in graph.node if any(o in used for o in n.output)]
            if len(keep) == len(graph.node):
                break
            del graph.node[:]
            graph.node.extend(keep)
        self._index()

    def pool_before_relu(self) -> None:
        """DQ -> ReLU -> Q -> DQ -> MaxPool -> Q on one grid becomes MaxPool first, then ReLU:
        the two commute exactly (both monotone), the pool then follows the integer conv in
        ONNX Runtime's NHWC layout and the ReLU runs on four times fewer values."""
        swapped = False
        for relu in list(self.model.graph.node):
            if relu.op_type not in ("Relu", "Clip"):
                continue
            first = self._dq_op_q(relu)
            if first is None:
                continue
            dq_a, q_b = first
            dq_b = self.consumers.get(q_b.output[0], [])
            pool = self.consumers.get(dq_b[0].output[0], []) if len(dq_b) == 1 else []
            if len(pool) != 1 or pool[0].op_type != "MaxPool" or len(pool[0].output) != 1:
                continue
            second = self._dq_op_q(pool[0])
            grid = self._grid(dq_a)
            if second is None or not (grid == self._grid(q_b) == self._grid(second[1])) \
                    or not self._relu_between(relu, grid[1], grid[0]):
                continue
            pool = pool[0]
            relu_out, pool_out = relu.output[0], pool.output[0]
            pool.input[0], pool.output[0] = relu.input[0], relu_out
            relu.input[0], relu.output[0] = dq_b[0].output[0], pool_out
            self._index()
            swapped = True
        if swapped:
            self._toposort()

    def _toposort(self) -> None:
        graph = self.model.graph
        ready = {i.name for i in graph.input} | set(self.inits) | {""}
        pending, ordered = list(graph.node), []
        while pending:
            rest = []
            for node in pending:
                if all(i in ready for i in node.input):
                    ordered.append(node)
                    ready.update(node.output)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                raise RuntimeError("internal error: the refined graph has a cycle")
            pending = rest
        del graph.node[:]
        graph.node.extend(ordered)
        self._index()

    def align_conv_channels(self) -> None:
        """Shapes ONNX Runtime's fast integer conv kernels need, computing the same values: a
        few-channel conv + 2x2 max-pool goes through SpaceToDepth (:mod:`.ort_space_to_depth`),
        output channels are zero-padded to a multiple of 16 and input channels to one of 4
        (:mod:`.ort_channel_padding`)."""
        changed = fuse_conv_pool_space_to_depth(self.model)
        changed += pad_conv_output_channels(self.model)
        changed += pad_conv_input_channels(self.model)
        if changed:
            del self.model.graph.value_info[:]  # channel counts changed; ONNX Runtime re-infers
            self.inits = {t.name: t for t in self.model.graph.initializer}
            self.constants.update(self.inits)
            self._toposort()

    def relu_to_lookup(self) -> None:
        """ReLU between a DQ and a Q -> LeakyRelu(alpha=0): an integer lookup table in ONNX Runtime."""
        for node in self.model.graph.node:
            if node.op_type not in ("Relu", "Clip"):
                continue
            pair = self._dq_op_q(node)
            if pair is None:
                continue
            scale, zp = self._grid(pair[0])
            if not self._relu_between(node, zp, scale):
                continue
            node.op_type = "LeakyRelu"
            del node.input[1:]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("alpha", 0.0))

    def _constant_bounds(self, clip: onnx.NodeProto) -> Optional[Tuple[Optional[float], Optional[float]]]:
        """A Clip's (min, max), None for an absent bound; None where a bound is not a constant."""
        bounds: List[Optional[float]] = [None, None]
        for i, name in enumerate(clip.input[1:3]):
            if name:
                if name not in self.constants:
                    return None
                bounds[i] = float(numpy_helper.to_array(self.constants[name]))
        return bounds[0], bounds[1]

    def _clip_is_relu(self, node: onnx.NodeProto, scale: float, zp: int) -> bool:
        bounds = self._constant_bounds(node)
        if bounds is None:
            return False
        lo, hi = bounds
        # the upper bound only matters if it changes a code: above code 254.5 it quantizes back to
        # 255 (a ReLU6 calibrated to exactly [0, 6] has hi == 255 * scale up to float rounding)
        return lo == 0.0 and (hi is None or hi > (254.5 - zp) * scale)

    def fp16_to_fp32(self) -> None:
        """The fp16 regions run in fp32: casts to fp16 become Identity (the casts back to fp32
        then cast fp32 to itself), fp16 initializers are widened. Other casts are the model's."""
        for node in self.model.graph.node:
            if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute):
                node.op_type = "Identity"
                del node.attribute[:]
        for t in self.model.graph.initializer:
            if t.data_type == TensorProto.FLOAT16:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def mean_to_global_pool(self) -> None:
        """ReduceMean over H and W of a 4-D tensor becomes GlobalAveragePool (the same mean), which
        ONNX Runtime runs as an integer kernel between Q/DQ pairs. Without kept dims a Flatten
        follows; a QuantizeLinear after the mean is repeated between the two (Flatten keeps the
        grid), so the pool still sits between Q/DQ."""
        graph = OnnxGraph(self.model)
        nodes = []
        for node in self.model.graph.node:
            nodes.append(node)
            if node.op_type != "ReduceMean" or not spatial_mean(graph, node):
                continue
            keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "GlobalAveragePool"
            if keep:
                continue
            out = node.output[0]
            readers = graph.readers(out)
            pooled = f"{out}/pooled"
            node.output[0] = pooled
            if len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and out not in self.graph_outputs:
                params = list(readers[0].input[1:])
                nodes.append(helper.make_node("QuantizeLinear", [pooled] + params, [f"{pooled}/q"],
                                              name=f"{node.name}/QuantizeLinear"))
                nodes.append(helper.make_node("DequantizeLinear", [f"{pooled}/q"] + params, [f"{pooled}/dq"],
                                              name=f"{node.name}/DequantizeLinear"))
                pooled = f"{pooled}/dq"
            nodes.append(helper.make_node("Flatten", [pooled], [out], axis=1, name=f"{node.name}/Flatten"))
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        self._index()

    def run(self) -> Tuple[onnx.ModelProto, List[str]]:
        self.mean_to_global_pool()
        self.activations_to_u8()
        self.drop_identity_requantization()
        self.pool_before_relu()
        self.relu_into_quantize()
        self.quantize_before_activation()
        self.align_conv_channels()
        self.relu_to_lookup()
        self.clip_codes()
        self.fp16_to_fp32()
        prune_initializers(self.model)
        return self.model, sorted(self.absorbed)


def _quantize_u8(value: np.ndarray, scale: float, zp: int) -> int:
    """ONNX QuantizeLinear of one value to uint8 (float32 division, round half to even, saturate)."""
    code = np.rint(np.float32(value) / np.float32(scale)) + zp
    return int(np.clip(code, 0, 255))


def activations_as_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every activation Q/DQ re-encoded from int8 to uint8 (zero point + 128: the
    same grid), the operand type x86 integer kernels take (ONNX Runtime's, and oneDNN's under
    OpenVINO, where int8 activations with a zero point run about 7x slower than uint8)."""
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    prune_initializers(refiner.model)
    return refiner.model


def refine_for_onnxruntime(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, List[str]]:
    """The annotated graph re-encoded for ONNX Runtime's CPU integer kernels (same values), and
    the ReLU nodes it removed because the quantized tensor before them is already non-negative."""
    refined, absorbed = _Refiner(model).run()
    return hardsigmoid_as_saturating_add(batchnorm_as_depthwise_conv(refined)), absorbed
