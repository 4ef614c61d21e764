"""Calibration config -> what every node and tensor of the fp32 ONNX graph runs in.

The plan reproduces the torch fake-quant model exactly. A wrapped module M quantizes

* its input, as seen by M only        -> a Q/DQ pair on the edges into M's nodes,
* its weight (per channel, axis 0)     -> int8 codes + per-channel scales on M's compute node,
* its output, as seen by every user    -> a Q/DQ pair right after M's output tensor.

Integer kernels need more than that: ONNX Runtime fuses DQ -> Conv -> Q only when the conv
output is quantized, and fuses pooling / reshapes only between equal Q/DQ pairs. Such ranges
are derived only where that is exact:

* backwards from a quantized tensor through ops that commute with quantization on the same
  grid (ReLU, Clip with bounds on or beyond the grid, MaxPool, Reshape, Flatten, Squeeze,
  Unsqueeze, Transpose, Identity), and only along single-consumer chains, so no other reader
  of the tensor sees different values;
* forwards through the same ops (their output stays on the input's grid).

Anything else stays float, and the node gets a note saying why (e.g. a conv output feeding a
residual Add whose result has no range). A range is never guessed.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from ..compressor.calibration import CalibrationConfig, layer_entries
from ..compressor.config import WEIGHT_TYPES, is_matmul_site, matmul_scope
from ..compressor.fake_quant import (FP16_BITS, is_integer_bits, is_per_channel, is_symmetric, qparams_from_range,
                                     quant_range, quantize)
from ..placement.onnx_graph import OnnxGraph
from ..placement.scopes import matmul_nodes
from .module_map import ModuleCall
from .onnx_export import FoldedBatchNorm, bn_factor, weight_axis

logger = logging.getLogger(__name__)

PRECISION_ORDER = {"int8": 0, "fp16": 1, "fp32": 2}
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# ops whose output stays on their input's grid (value-preserving or monotone selection)
GRID_PRESERVING = {"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"}
# ops a backend can run on integers when inputs and output are quantized
INTEGER_CAPABLE = {"Conv", "Gemm", "MatMul", "Add", "Mul", "GlobalAveragePool", "AveragePool", "Concat",
                   "LeakyRelu", "Sigmoid", "Softmax"}
# integer kernels that may return float (QGemm, MatMulIntegerToFloat): no output range needed
FLOAT_OUTPUT_OK = {"Gemm", "MatMul"}
# grid-preserving ops that backends run on integers only between equal Q/DQ pairs
_REQUANT_AFTER = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


def precision_of_bits(bits: Optional[int]) -> str:
    """'int8' for 1..8 bits, 'fp16' for 16, 'fp32' otherwise (or not quantized)."""
    if bits is None:
        return "fp32"
    if is_integer_bits(bits):
        return "int8"
    return "fp16" if bits == FP16_BITS else "fp32"


@dataclass(frozen=True)
class Grid:
    """A per-tensor integer grid: the real values ``k * scale`` for integers ``lo <= k <= hi``.

    Stored in int8 with zero point :attr:`zero_point`; :attr:`needs_clip` says the grid is
    narrower than int8 (2-7 bits), so a Clip must follow the DequantizeLinear.
    """

    scale: float
    lo: int
    hi: int

    @property
    def zero_point(self) -> int:
        return 0 if self.lo >= -128 and self.hi <= 127 else -128 - self.lo

    @property
    def needs_clip(self) -> bool:
        return (self.lo, self.hi) != (-128 - self.zero_point, 127 - self.zero_point)

    @property
    def real_min(self) -> float:
        return float(np.float32(self.lo) * np.float32(self.scale))

    @property
    def real_max(self) -> float:
        return float(np.float32(self.hi) * np.float32(self.scale))

    def admits_bound(self, value: Optional[float], upper: bool) -> bool:
        """True if clipping at ``value`` commutes with quantizing on this grid."""
        if value is None:
            return True
        if (upper and value >= self.real_max) or (not upper and value <= self.real_min):
            return True
        k = value / self.scale
        return abs(k - round(k)) < 1e-4 and self.lo <= round(k) <= self.hi


def grid_from_range(min_val: float, max_val: float, bits: int, scheme: str, dtype: str) -> Grid:
    """The grid :func:`qparams_from_range` gives a tracked range (what the quantizer simulated)."""
    scale, zero_point = qparams_from_range(torch.tensor(min_val), torch.tensor(max_val), bits, scheme, dtype)
    qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
    zp = int(zero_point)
    return Grid(float(np.float32(float(scale))), qmin - zp, qmax - zp)


@dataclass
class WeightQuant:
    """Integer weights of one node, laid out as its ONNX initializer, stored in int8."""

    codes: np.ndarray            # int8, shape of the ONNX weight
    scales: np.ndarray           # float32, one per channel (or one)
    zero_points: np.ndarray      # int8, same length as scales
    axis: Optional[int]          # channel axis in the ONNX layout, None for one scale
    bits: int


class FoldError(ValueError):
    """A BatchNorm cannot be folded into its conv without changing the integer weights."""


@dataclass
class LayerPlan:
    """What the plan does for one configured (or extra) layer."""

    name: str
    requested: str
    nodes: List[str] = field(default_factory=list)
    note: str = ""


@dataclass
class PrecisionPlan:
    """Everything :mod:`mixq.speedup.onnx_qdq` inserts into the fp32 graph."""

    tensor_grids: Dict[str, List[Grid]] = field(default_factory=dict)
    edge_grids: Dict[Tuple[str, str], Grid] = field(default_factory=dict)
    tensor_fp16: Set[str] = field(default_factory=set)
    edge_fp16: Set[Tuple[str, str]] = field(default_factory=set)
    fp16_nodes: Set[str] = field(default_factory=set)
    weights: Dict[str, WeightQuant] = field(default_factory=dict)
    dynamic: Dict[str, WeightQuant] = field(default_factory=dict)  # MatMul/Gemm with run-time activation quantization
    layers: Dict[str, LayerPlan] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)  # node -> why its output has no range

    def layer_nodes(self) -> Dict[str, List[str]]:
        return {name: list(layer.nodes) for name, layer in self.layers.items()}


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def _channel_shape(weight: torch.Tensor, axis: int) -> List[int]:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return shape


def weight_codes(weight: torch.Tensor, entry: Mapping[str, Any], layer: str,
                 bn: Optional[FoldedBatchNorm], fold_at_export: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[int]]:
    """Integer codes (int8 range), scales, zero points and channel axis of a layer's weight as
    the exported graph holds it (folded or not), from the raw module ``weight`` and its entry.

    ``entry['folded_bn']`` says which weight the scales refer to (the BN-folded one or the raw
    one); ``fold_at_export`` says which one the graph holds. Per-channel rescaling by the BN
    factor converts one into the other without touching the integers (a negative factor flips
    their sign). Raises :class:`FoldError` where that is impossible.
    """
    bits, scheme, dtype = entry["weight_bits"], entry["weight_scheme"], entry["weight_dtype"]
    qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
    scales = torch.tensor(entry["weight_scale"], dtype=torch.float32)
    zps = torch.tensor(entry["weight_zero_point"], dtype=torch.int64)
    axis = entry.get("weight_axis") if is_per_channel(scheme) else None
    weight = weight.detach().float()
    if is_per_channel(scheme) and (axis is None or not 0 <= axis < weight.dim()
                                   or scales.numel() != weight.shape[axis]):
        raise ValueError(f"calibration entry {layer!r}: {scales.numel()} weight_scale values along weight_axis "
                         f"{axis!r} do not fit its weight of shape {tuple(weight.shape)}: export the calibration "
                         "from this model")
    ref = weight
    config_folded = entry.get("folded_bn") is not None
    if config_folded:
        if bn is None or entry["folded_bn"] not in (bn.bn, f"{bn.bn}.module"):  # or the inner module of a wrapped BN
            raise FoldError(f"layer {layer!r}: the calibration folded BatchNorm {entry['folded_bn']!r}, which does "
                            "not directly follow it in this model")
        ref = weight * bn.factor.reshape(_channel_shape(weight, bn.axis))
    codes = quantize(ref, scales, zps, qmin, qmax, axis)
    _check_codes(ref, codes, scales, zps, qmin, qmax, axis, layer, is_symmetric(scheme))
    if config_folded != fold_at_export:
        f = bn.factor.float()
        if axis is None:  # one scale becomes one per channel: s * |f_c|
            scales, zps, axis = scales.expand(f.numel()).clone(), zps.expand(f.numel()).clone(), bn.axis
        if axis != bn.axis:
            raise FoldError(f"layer {layer!r}: weight scales are per axis {axis}, BatchNorm folds along axis {bn.axis}")
        if bool((f == 0).any()):
            raise FoldError(f"layer {layer!r}: BatchNorm {bn.bn!r} has a zero scale factor")
        sign = torch.sign(f)
        codes = codes * sign.reshape(_channel_shape(codes, axis))
        zps = zps * sign.to(torch.int64)
        scales = scales * f.abs() if fold_at_export else scales / f.abs()
    if dtype == "uint":  # same real values on the int8 storage grid
        codes, zps = codes - 128, zps - 128
    if bool((codes < -128).any() or (codes > 127).any()):
        raise FoldError(f"layer {layer!r}: folding BatchNorm {bn.bn if bn else ''!r} flips a weight code of -128 "
                        "out of the int8 range")
    return codes, scales, zps, axis


# the scale an all-zero channel gets (a pruned filter, a zero-initialised head): any grid fits it
_SMALLEST_SCALE = 1.0001 * torch.finfo(torch.float32).eps


def _check_codes(ref: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, qmin: int,
                 qmax: int, axis: Optional[int], layer: str, symmetric: bool) -> None:
    """The scales must belong to this weight: every observer picks a grid inside the weight's
    own range (widened to 0, within a step) that leaves most of each channel's values inside it."""
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError(f"calibration entry {layer!r}: weight_scale holds values that are not positive finite "
                         "float32 numbers: export the calibration again")
    rows = ref.transpose(0, axis).reshape(ref.shape[axis], -1) if axis is not None else ref.reshape(1, -1)
    lo = torch.clamp(rows.min(dim=1).values, max=0.0)
    hi = torch.clamp(rows.max(dim=1).values, min=0.0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    grid_lo, grid_hi = (qmin - zps) * scales, (qmax - zps) * scales
    too_wide = ((grid_hi > hi + 1.01 * scales) | (grid_lo < lo - 1.01 * scales)) & (scales > _SMALLEST_SCALE)
    # values more than half a step outside the grid, per channel (a clipping observer clips a few)
    steps = rows / scales.reshape(-1, 1) + zps.reshape(-1, 1)
    outside = ((steps < qmin - 0.501) | (steps > qmax + 0.501)).float().mean(dim=1)
    if bool(too_wide.any()) or bool((outside > 0.5).any()):
        channel = int(torch.nonzero(too_wide | (outside > 0.5))[0])
        why = ("its scale is wider than the weights" if bool(too_wide[channel])
               else f"{float(outside[channel]):.0%} of its weights fall outside the grid")
        raise ValueError(f"the calibration config of layer {layer!r} does not match the model's weights (channel "
                         f"{channel}: {why}): pass the model the calibration was exported from")


def onnx_weight_quant(codes: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, axis: Optional[int],
                      onnx_weight: np.ndarray, reference: torch.Tensor, bits: int) -> Optional[WeightQuant]:
    """Lay codes out like the ONNX initializer ``onnx_weight``: the same layout as ``reference``
    (the float weight the codes quantize, in torch's layout), or its transpose (a Linear exported
    as MatMul holds W^T; for a square weight only the values tell which)."""
    shape = list(onnx_weight.shape)
    ref = reference.detach().float().numpy()
    transposed = codes.dim() == 2 and list(codes.shape[::-1]) == shape and (
        list(codes.shape) != shape or np.abs(onnx_weight - ref.T).max() < np.abs(onnx_weight - ref).max())
    if transposed:
        codes = codes.t()
        axis = None if axis is None else 1 - axis
    elif list(codes.shape) != shape:
        return None
    return WeightQuant(codes.to(torch.int8).numpy(), scales.numpy().astype(np.float32),
                       zps.to(torch.int8).numpy(), axis, bits)


def choose_folds(model: nn.Module, pairs: Mapping[str, str], config: CalibrationConfig,
                 placed: bool = False) -> Dict[str, str]:
    """The Conv -> BN pairs that can be folded consistently with the calibration: not when the
    conv's output or the BN's input is quantized (that sits between the two; a placed
    calibration quantizes after the BN, as the backend folds it), nor when the integer weights
    would not survive folding."""
    folds = {}
    for conv_name, bn_name in pairs.items():
        conv_entry, bn_entry = config.get(conv_name, {}), config.get(bn_name, {})
        if not placed and ("output_bits" in conv_entry or "input_bits" in bn_entry):
            logger.info("not folding %s into %s: a quantizer sits between them", bn_name, conv_name)
            continue
        if is_integer_bits(conv_entry.get("weight_bits", 32)):
            conv = model.get_submodule(conv_name)
            bn = FoldedBatchNorm(conv_name, bn_name, bn_factor(model.get_submodule(bn_name)), weight_axis(conv))
            try:
                weight_codes(conv.weight, conv_entry, conv_name, bn, fold_at_export=True)
            except FoldError as exc:
                logger.warning("not folding %s into %s: %s", bn_name, conv_name, exc)
                continue
        folds[conv_name] = bn_name
    return folds


# ---------------------------------------------------------------------------------------------
# The graph plan
# ---------------------------------------------------------------------------------------------

class _Graph:
    """Index of an ONNX graph: producers, consumers, constants, float tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.initializers = {i.name: i for i in graph.initializer}
        self.constants: Dict[str, onnx.TensorProto] = dict(self.initializers)
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = a.t
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in dict.fromkeys(n.input):
                if name:
                    self.consumers[name].append(n)
        self.outputs = {o.name for o in graph.output}
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
        self.float_tensors = {n for n, t in types.items() if t == onnx.TensorProto.FLOAT}

    def constant(self, name: str) -> Optional[np.ndarray]:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def is_activation(self, name: str) -> bool:
        return bool(name) and name not in self.constants and name in self.float_tensors

    def data_nodes(self, names: Sequence[str]) -> List[str]:
        """The nodes among ``names`` that compute on float activations (not shape helpers)."""
        return [n for n in names if any(self.is_activation(i) for i in self.by_name[n].input)]

    def clip_bounds(self, node: onnx.NodeProto) -> Tuple[Optional[float], Optional[float]]:
        bounds: List[Optional[float]] = [None, None]
        for i, name in enumerate(node.input[1:3]):
            value = self.constant(name) if name else None
            bounds[i] = None if value is None else float(value)
        for a in node.attribute:  # opset < 11
            if a.name in ("min", "max"):
                bounds[0 if a.name == "min" else 1] = a.f
        return bounds[0], bounds[1]


@dataclass
class LayerSpec:
    """One layer's quantization as the plan needs it (from a calibration entry)."""

    name: str
    entry: Dict[str, Any]
    weighted: bool = False  # a Conv/Linear: its precision is its weight's

    def bits(self, qtype: str) -> Optional[int]:
        return self.entry.get(f"{qtype}_bits")

    def grid(self, qtype: str) -> Optional[Grid]:
        e = self.entry
        bits = e.get(f"{qtype}_bits")
        if bits is None or not is_integer_bits(bits) or f"tracked_min_{qtype}" not in e:
            return None
        return grid_from_range(e[f"tracked_min_{qtype}"], e[f"tracked_max_{qtype}"], bits, e[f"{qtype}_scheme"],
                               e[f"{qtype}_dtype"])

    @property
    def requested(self) -> str:
        if "weight_bits" in self.entry or self.weighted:
            return precision_of_bits(self.entry.get("weight_bits"))
        bits = [b for b in (self.bits("output"), self.bits("input")) if b is not None]
        return precision_of_bits(min(bits)) if bits else "fp32"


class _Planner:
    def __init__(self, model: onnx.ModelProto, calls: Mapping[str, List[ModuleCall]],
                 folded: Mapping[str, FoldedBatchNorm], torch_model: nn.Module) -> None:
        self.g = _Graph(model)
        self.calls = dict(calls)
        self.folded = folded
        self.torch_model = torch_model
        self.plan = PrecisionPlan()
        self.bn_alias = {f.bn: conv for conv, f in folded.items()}
        self.placed = False  # a placed calibration: its tensors are all there is, nothing is derived backwards

    # -- layer configuration -------------------------------------------------------------------
    def layer_calls(self, name: str) -> List[ModuleCall]:
        if name in self.bn_alias:  # a folded BN's output is its conv's output
            return [ModuleCall(name, c.nodes, [], c.outputs) for c in self.calls.get(self.bn_alias[name], [])]
        return self.calls.get(name, [])

    def add_layer(self, spec: LayerSpec, activations: bool = True) -> None:
        """Plan one configured layer; ``activations=False`` when placed points quantize them."""
        layer = LayerPlan(spec.name, spec.requested)
        self.plan.layers[spec.name] = layer
        calls = self.layer_calls(spec.name)
        if not calls:
            layer.note = "the layer has no node in the exported graph (it computes nothing at inference)"
            return
        for call in calls:
            layer.nodes.extend(self.g.data_nodes(call.nodes))
            if activations or any(spec.bits(q) == FP16_BITS for q in ("input", "output")):
                self._activation(spec, call, "input", call.inputs, layer)
                self._activation(spec, call, "output", call.outputs, layer)
            if spec.bits("weight") is not None and spec.name not in self.bn_alias:
                self._weight(spec, call, layer)

    def _activation(self, spec: LayerSpec, call: ModuleCall, qtype: str, tensors: List[str], layer: LayerPlan) -> None:
        bits = spec.bits(qtype)
        if bits is None or bits > FP16_BITS or bits == 32:
            return
        tensors = [t for t in tensors if self.g.is_activation(t)]
        if len(tensors) != 1:
            layer.note = (f"{qtype} quantization needs exactly one {qtype} tensor, the graph has {len(tensors)} "
                          "for this module; it was not applied")
            return
        t = tensors[0]
        grid = spec.grid(qtype)
        if qtype == "output":
            if grid is not None:
                self.plan.tensor_grids.setdefault(t, []).append(grid)
            elif bits == FP16_BITS:
                self.plan.tensor_fp16.add(t)
            return
        for node in call.nodes:
            if t in self.g.by_name[node].input:
                if grid is not None:
                    self.plan.edge_grids[(t, node)] = grid
                elif bits == FP16_BITS:
                    self.plan.edge_fp16.add((t, node))

    def _weight(self, spec: LayerSpec, call: ModuleCall, layer: LayerPlan) -> None:
        bits = spec.bits("weight")
        nodes = [self.g.by_name[n] for n in call.nodes if self.g.by_name[n].op_type in WEIGHTED_OPS]
        if len(nodes) != 1:
            layer.note = f"expected one Conv/Gemm/MatMul node for the weight, found {len(nodes)}"
            return
        node = nodes[0]
        layer.nodes = [node.name] + [n for n in layer.nodes if n != node.name]
        if bits == FP16_BITS:
            self.plan.fp16_nodes.add(node.name)
            return
        if not is_integer_bits(bits):
            return
        init = self.g.initializers.get(node.input[1]) if len(node.input) > 1 else None
        if init is None:
            layer.note = "its weight is computed in the graph, not stored; it runs in float"
            return
        module = self.torch_model.get_submodule(spec.name)
        codes, scales, zps, axis = weight_codes(module.weight, spec.entry, spec.name, self.folded.get(spec.name),
                                                spec.name in self.folded)
        folded = self.folded.get(spec.name)
        reference = module.weight if folded is None else \
            module.weight.detach() * folded.factor.reshape(_channel_shape(module.weight, folded.axis))
        wq = onnx_weight_quant(codes, scales, zps, axis, numpy_helper.to_array(init), reference, bits)
        if wq is None:
            layer.note = f"the ONNX weight has shape {list(init.dims)}, the module's {list(codes.shape)}; it runs in float"
            return
        if spec.entry.get("quant_dynamic"):
            if node.op_type not in ("MatMul", "Gemm"):
                layer.note = f"dynamic quantization runs MatMul/Gemm nodes, this layer is a {node.op_type}"
                return
            self.plan.dynamic[node.name] = wq
            return
        self.plan.weights[node.name] = wq

    # -- derivations ---------------------------------------------------------------------------
    def view_grid(self, tensor: str, node: str) -> Optional[Grid]:
        """The grid ``node`` sees ``tensor`` on (after all Q/DQ pairs on the way), if any."""
        grid = self.plan.edge_grids.get((tensor, node))
        if grid is not None:
            return grid
        grids = self.plan.tensor_grids.get(tensor)
        return grids[-1] if grids else None

    def _preserves(self, node: onnx.NodeProto, grid: Grid) -> bool:
        if node.op_type not in GRID_PRESERVING:
            return False
        if node.op_type == "Clip":
            lo, hi = self.g.clip_bounds(node)
            return grid.admits_bound(lo, upper=False) and grid.admits_bound(hi, upper=True)
        if node.op_type == "MaxPool":
            return len([o for o in node.output if o and self.g.consumers.get(o)]) <= 1
        return True

    def _derive_backwards(self, tensor: str) -> Tuple[Optional[Grid], List[str], str]:
        """Follow the single-consumer chain from ``tensor`` to a quantized tensor or edge;
        return (grid, chain of tensors to quantize on it, why not)."""
        chain, users = [tensor], []
        grid = None
        while grid is None:
            t = chain[-1]
            readers = self.g.consumers.get(t, [])
            if t in self.g.outputs:
                return None, [], "it is a graph output"
            if len(readers) != 1:
                return None, [], f"it is read by {len(readers)} nodes ({', '.join(u.name for u in readers[:3])})"
            user = readers[0]
            grid = self.plan.edge_grids.get((t, user.name))
            if grid is not None:
                break
            if user.op_type not in GRID_PRESERVING:
                return None, [], f"it feeds {user.op_type} node {user.name}, through which no range can be derived"
            users.append(user)
            grids = self.plan.tensor_grids.get(user.output[0])
            if grids:
                grid = grids[0]
            else:
                chain.append(user.output[0])
        for user in users:
            if not self._preserves(user, grid):
                return None, [], f"{user.op_type} node {user.name} does not commute with quantization on the range after it"
        return grid, chain, ""

    def derive(self) -> None:
        for node in self.g.nodes:
            data_inputs = [i for i in node.input if self.g.is_activation(i)]
            if not data_inputs or not node.output:
                continue
            out = node.output[0]
            grids_in = [self.view_grid(i, node.name) for i in data_inputs]
            if node.op_type in GRID_PRESERVING and grids_in[0] is not None and self._preserves(node, grids_in[0]):
                self._propagate_forward(node, grids_in[0])
                continue
            if self.placed or node.op_type not in INTEGER_CAPABLE or self.plan.tensor_grids.get(out):
                continue
            if any(g is None for g in grids_in):
                continue
            if node.op_type in WEIGHTED_OPS and node.name not in self.plan.weights:
                continue
            grid, chain, why = self._derive_backwards(out)
            if grid is None:
                self.plan.notes[node.name] = f"its output has no quantization range: {why}"
                continue
            for t in chain:
                self.plan.tensor_grids.setdefault(t, []).insert(0, grid)

    def _propagate_forward(self, node: onnx.NodeProto, grid: Grid) -> None:
        out = node.output[0]
        grids = self.plan.tensor_grids.setdefault(out, [])
        if not grids:
            grids.append(grid)
        elif grids[0] != grid and node.op_type in _REQUANT_AFTER:
            grids.insert(0, grid)  # run the op on its input's grid, then requantize

    def simplify(self) -> None:
        """Drop Q/DQ pairs that re-quantize a tensor onto the grid it is already on."""
        for t, grids in self.plan.tensor_grids.items():
            kept: List[Grid] = []
            for g in grids:
                if not kept or kept[-1] != g:
                    kept.append(g)
            self.plan.tensor_grids[t] = kept
        for (t, node), grid in list(self.plan.edge_grids.items()):
            grids = self.plan.tensor_grids.get(t)
            if grids and grids[-1] == grid:
                del self.plan.edge_grids[(t, node)]

    def explain(self) -> None:
        """Record, per layer, why a requested int8 layer cannot run as an integer kernel."""
        for layer in self.plan.layers.values():
            if layer.requested != "int8" or layer.note or not layer.nodes or layer.nodes[0] in self.plan.dynamic:
                continue
            node = self.g.by_name[layer.nodes[0]]
            data_inputs = [i for i in node.input if self.g.is_activation(i)]
            if node.op_type in WEIGHTED_OPS and node.name not in self.plan.weights:
                layer.note = "its weight is not quantized (add 'weight' to quant_types)"
            elif any(self.view_grid(i, node.name) is None for i in data_inputs):
                layer.note = ("its input is not quantized: add 'input' to its quant_types or quantize the "
                              "output of the layer before it")
            elif node.name in self.plan.notes and node.op_type not in FLOAT_OUTPUT_OK:
                layer.note = self.plan.notes[node.name] + "; quantize the output of this layer (or of the BatchNorm " \
                                                          "folded into it) to run it as an integer kernel"


def build_plan(model: onnx.ModelProto, calls: Mapping[str, List[ModuleCall]], folded: Mapping[str, FoldedBatchNorm],
               torch_model: nn.Module, config: CalibrationConfig, extra_layers: Sequence[str] = (),
               extra_layer_bits: int = 32, points: Optional[Mapping[str, Grid]] = None,
               point_edges: Optional[Mapping[Tuple[str, str], Grid]] = None) -> PrecisionPlan:
    """Plan the precision of every node of ``model`` (the fp32 export of ``torch_model``,
    BN folded as ``folded`` says) from ``config``.

    ``extra_layers`` are layers absent from ``config`` that run at ``extra_layer_bits``
    (16 or 32 here; 8-bit extra layers need ranges, so they arrive calibrated in ``config``).
    ``points``/``point_edges`` are a placed calibration's tensors (located in ``model``): they
    quantize the activations, and the layers' own activation entries are then only informative.
    """
    planner = _Planner(model, calls, folded, torch_model)
    placed = planner.placed = points is not None
    for name, entry in layer_entries(config).items():
        if is_matmul_site(name):  # activation x activation products: their operands are placed points
            sites = matmul_nodes(OnnxGraph(model), calls, matmul_scope(name))
            planner.plan.layers[name] = LayerPlan(name, "int8", sites, "" if sites else
                                                  "no matrix product of two activations is computed there")
            continue
        planner.add_layer(LayerSpec(name, entry, isinstance(torch_model.get_submodule(name), WEIGHT_TYPES)),
                          activations=not placed)
    for tensor, grid in (points or {}).items():
        planner.plan.tensor_grids.setdefault(tensor, []).append(grid)
    planner.plan.edge_grids.update(point_edges or {})
    if extra_layer_bits == FP16_BITS:
        for name in extra_layers:
            planner.add_layer(LayerSpec(name, {"type": type(torch_model.get_submodule(name)).__name__,
                                               "weight_bits": 16}, True))
    planner.derive()
    planner.simplify()
    planner.explain()
    return planner.plan
