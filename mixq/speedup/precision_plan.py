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
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import onnx
import torch.nn as nn
from onnx import numpy_helper

from ..compressor.calibration import CalibrationConfig, layer_entries
from ..compressor.calibration_record import LayerCalibration, QuantParams
from ..compressor.config import WEIGHT_TYPES, is_matmul_site, matmul_scope
from ..compressor.fake_quant import FP16_BITS, is_integer_bits
from ..placement.onnx_graph import OnnxGraph
from ..placement.scopes import matmul_nodes
from .grid import Grid, grid_of, precision_of_bits
from ..placement.module_map import ModuleCall
from ..placement.onnx_export import FoldedBatchNorm
from .weight_codes import WeightQuant, channel_shape, onnx_weight_quant, weight_codes

logger = logging.getLogger(__name__)

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


@dataclass
class LayerSpec:
    """One layer's quantization as the plan needs it (from a calibration entry)."""

    name: str
    layer: LayerCalibration
    weighted: bool = False  # a Conv/Linear: its precision is its weight's

    def bits(self, qtype: str) -> Optional[int]:
        params = self.layer.params(qtype)
        return None if params is None else params.bits

    def grid(self, qtype: str) -> Optional[Grid]:
        return grid_of(self.layer.params(qtype))

    @property
    def requested(self) -> str:
        if self.layer.weight is not None or self.weighted:
            return precision_of_bits(self.bits("weight"))
        bits = [b for b in (self.bits("output"), self.bits("input")) if b is not None]
        return precision_of_bits(min(bits)) if bits else "fp32"


class _Planner:
    def __init__(self, model: onnx.ModelProto, calls: Mapping[str, List[ModuleCall]],
                 folded: Mapping[str, FoldedBatchNorm], torch_model: nn.Module) -> None:
        self.g = OnnxGraph(model)
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
        codes, scales, zps, axis = weight_codes(module.weight, spec.layer, spec.name, self.folded.get(spec.name),
                                                spec.name in self.folded)
        folded = self.folded.get(spec.name)
        reference = module.weight if folded is None else \
            module.weight.detach() * folded.factor.reshape(channel_shape(module.weight, folded.axis))
        wq = onnx_weight_quant(codes, scales, zps, axis, numpy_helper.to_array(init), reference, bits)
        if wq is None:
            layer.note = f"the ONNX weight has shape {list(init.dims)}, the module's {list(codes.shape)}; it runs in float"
            return
        if spec.layer.quant_dynamic:
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
               point_edges: Optional[Mapping[Tuple[str, str], Grid]] = None,
               float_layers: Optional[Mapping[str, str]] = None) -> PrecisionPlan:
    """Plan the precision of every node of ``model`` (the fp32 export of ``torch_model``,
    BN folded as ``folded`` says) from ``config``.

    ``extra_layers`` are layers absent from ``config`` that run at ``extra_layer_bits``
    (16 or 32 here; 8-bit extra layers need ranges, so they arrive calibrated in ``config``).
    ``points``/``point_edges`` are a placed calibration's tensors (located in ``model``): they
    quantize the activations, and the layers' own activation entries are then only informative.
    ``float_layers`` are layers asked for int8 that stay fp32, with why (reported as such).
    """
    planner = _Planner(model, calls, folded, torch_model)
    for name, note in (float_layers or {}).items():
        nodes = [n for call in planner.layer_calls(name) for n in planner.g.data_nodes(call.nodes)]
        planner.plan.layers[name] = LayerPlan(name, "int8", nodes, note)
    placed = planner.placed = points is not None
    for name, entry in layer_entries(config).items():
        if is_matmul_site(name):  # activation x activation products: their operands are placed points
            sites = matmul_nodes(planner.g, calls, matmul_scope(name))
            planner.plan.layers[name] = LayerPlan(name, "int8", sites, "" if sites else
                                                  "no matrix product of two activations is computed there")
            continue
        planner.add_layer(LayerSpec(name, LayerCalibration.from_dict(entry),
                                    isinstance(torch_model.get_submodule(name), WEIGHT_TYPES)), activations=not placed)
    for tensor, grid in (points or {}).items():
        planner.plan.tensor_grids.setdefault(tensor, []).append(grid)
    planner.plan.edge_grids.update(point_edges or {})
    if extra_layer_bits == FP16_BITS:
        for name in extra_layers:
            planner.add_layer(LayerSpec(name, LayerCalibration(type(torch_model.get_submodule(name)).__name__,
                                                               QuantParams(FP16_BITS)), True))
    planner.derive()
    planner.simplify()
    planner.explain()
    return planner.plan
