"""A model's placement: which torch tensors a quantizer must observe and fake-quantize so that
the engine the backend builds computes exactly what the quantizer simulated.

:func:`plan_points` exports the float model (BatchNorm folded, as the engine will be), runs
the backend policy (:mod:`.policy`) on the graph, and maps every quantized ONNX tensor to the
torch tensor that holds it (:mod:`.matching`), giving point keys
(:mod:`mixq.compressor.call_points`) with their bits and grid.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from ..compressor.call_points import PointKey, key_module, trace_points
from ..compressor.config import WEIGHT_TYPES, is_matmul_site, matmul_scope
from ..compressor.fake_quant import is_integer_bits
from ..compressor.model_io import ModelInputs
from .module_map import module_calls
from .onnx_export import DEFAULT_EXPORTER, conv_bn_pairs, export_onnx
from .matching import match_input, match_tensors, onnx_tensor_values, probe_copy, probe_inputs
from .onnx_graph import WEIGHTED_OPS, OnnxGraph
from .scopes import matmul_nodes, module_tree_nodes
from .op_rules import OpRules, rules_for
from .policy import Placement, PointSpec, Request, place, readers_by_layer

logger = logging.getLogger(__name__)

QUANT_ACTIVATIONS = ("input", "output")


@dataclass
class LayerIntent:
    """What the config asks of one module: weight bits and explicit activation quantization."""

    name: str
    weight_bits: Optional[int] = None
    activations: Dict[str, PointSpec] = field(default_factory=dict)  # 'input'/'output' -> spec
    dynamic: bool = False  # activations quantized at run time: no placed point, not a static integer node

    @property
    def is_float(self) -> bool:
        bits = [self.weight_bits] if self.weight_bits is not None else [s.bits for s in self.activations.values()]
        return bool(bits) and all(not is_integer_bits(b) for b in bits)


@dataclass
class PointPlan:
    """The result: points to observe, keyed by torch point key, and what they serve."""

    backend: str
    points: Dict[PointKey, PointSpec] = field(default_factory=dict)
    serves: Dict[str, Dict[str, PointKey]] = field(default_factory=dict)   # layer -> {'input'/'output': key}
    notes: Dict[str, str] = field(default_factory=dict)                    # layer -> why it stays float
    placement: Optional[Placement] = None
    tensor_keys: Dict[str, PointKey] = field(default_factory=dict)         # ONNX tensor -> key
    node_layers: Dict[str, str] = field(default_factory=dict)              # ONNX node -> configured layer
    point_tensors: Dict[PointKey, str] = field(default_factory=dict)       # key -> ONNX tensor (this exporter's name)
    bias_inputs: Dict[str, PointKey] = field(default_factory=dict)         # layer -> point scaling its int32 bias
    folded_bn: Dict[str, str] = field(default_factory=dict)                # conv -> the BatchNorm the export folds in
    # BatchNorm output -> (its input's point, the module): run as an integer channel affine (bias rounded)
    channel_affines: Dict[PointKey, Tuple[PointKey, str]] = field(default_factory=dict)
    # a Concat input -> the Concat output point whose grid the engine quantizes it on (not simulated
    # separately: one grid commutes with concatenation)
    shared: Dict[PointKey, PointKey] = field(default_factory=dict)

    def grid(self, key: PointKey, rules: Optional[OpRules] = None) -> Tuple[int, str, str]:
        """``(bits, scheme, dtype)`` of a point, the backend's default filled in."""
        rules = rules or rules_for(self.backend)
        spec = self.points[key]
        return spec.bits, spec.scheme or rules.default_scheme, spec.dtype or rules.default_dtype


def plan_points(model: nn.Module, example_inputs: Any, intents: Mapping[str, LayerIntent],
                backend: str, excluded: Sequence[str] = (), exporter: str = DEFAULT_EXPORTER) -> PointPlan:
    """Place quantization for ``model`` (float, unwrapped) on ``backend``; see the module docstring.

    ``example_inputs``: one call's inputs (:class:`~mixq.compressor.model_io.ModelInputs` or
    what it takes); ``intents`` are the configured layers; ``excluded`` names modules the config
    keeps in float.
    """
    rules = rules_for(backend)
    model = probe_copy(model)
    example = probe_inputs(ModelInputs.of(example_inputs, model).first(1))
    pairs = conv_bn_pairs(model, example)
    exported = export_onnx(model, example, pairs, exporter, split_hardswish=rules.split_hardswish)
    names = [n for n, _ in model.named_modules()]
    calls = module_calls(exported.model, names)
    bn_alias = {f.bn: conv for conv, f in exported.folded.items()}
    g = OnnxGraph(exported.model)
    plan = PointPlan(backend)

    int_nodes: List[str] = []
    weight_nodes: Dict[str, List[str]] = {}
    float_nodes: Set[str] = set()
    for name in excluded:
        float_nodes |= module_tree_nodes(calls, name)
    requests: List[Request] = []
    for name, intent in intents.items():
        if is_matmul_site(name):
            spec = intent.activations.get("input", PointSpec())
            sites = matmul_nodes(g, calls, matmul_scope(name))
            int_nodes += sites
            requests += [Request(name, "input", t, (n,), spec) for n in sites
                         for t in g.activation_inputs(g.by_name[n])]
            plan.node_layers.update({n: name for n in sites})
            if not sites:
                plan.notes[name] = "no matrix product of two activations is computed there"
            continue
        module_calls_ = calls.get(bn_alias.get(name, name), [])
        plan.node_layers.update({n: name for c in module_calls_ for n in c.nodes})
        if intent.is_float or intent.dynamic:
            float_nodes |= module_tree_nodes(calls, name)
            continue
        weighted = intent.weight_bits is not None and isinstance(model.get_submodule(name), WEIGHT_TYPES)
        for call in module_calls_:
            nodes = g.data_nodes(call.nodes)
            if weighted and is_integer_bits(intent.weight_bits) and name not in bn_alias:
                w = [n for n in nodes if g.by_name[n].op_type in WEIGHTED_OPS and g.weight_initializer(g.by_name[n])]
                if len(w) == 1:
                    int_nodes.append(w[0])
                    weight_nodes.setdefault(name, []).append(w[0])
                else:
                    plan.notes[name] = f"expected one Conv/Gemm/MatMul node with a stored weight, found {len(w)}"
            for kind, spec in intent.activations.items():
                if not is_integer_bits(spec.bits):
                    continue
                tensors = [t for t in (call.inputs if kind == "input" else call.outputs) if g.is_activation(t)]
                if len(tensors) != 1:
                    plan.notes.setdefault(name, f"{kind} quantization needs one {kind} tensor, the graph has "
                                                f"{len(tensors)}; it was not applied")
                    continue
                readers = readers_by_layer(g, nodes, tensors[0]) if kind == "input" else ()
                requests.append(Request(name, kind, tensors[0], readers, spec))

    wanted = [t for n in g.nodes for t in list(n.input) + list(n.output) if g.is_activation(t)]
    with torch.no_grad():
        onnx_values = onnx_tensor_values(exported.model, example, wanted)
        records = trace_points(model, example)
    keys = match_tensors(onnx_values, records)
    blocked = {t: "no torch tensor holds it (it only exists inside an exported op)"
               for t in onnx_values if t not in keys}
    batchnorms = _batchnorm_calls(g, model, keys)
    float_nodes |= {n.name for n in g.nodes if n.op_type == "BatchNormalization" and n.name not in batchnorms}
    placement = place(g, rules, int_nodes, float_nodes, requests, blocked)
    plan.placement = placement
    plan.tensor_keys = keys

    for tensor, spec in list(placement.points.items()) + list(placement.requant.items()):
        plan.points[keys[tensor]] = spec
        plan.point_tensors[keys[tensor]] = tensor
    for tensor, concat in placement.shared.items():
        plan.shared[keys[tensor]] = keys[concat]
        plan.point_tensors[keys[tensor]] = tensor
    node_call = {n: (module, i) for module, cs in calls.items() for i, c in enumerate(cs) for n in c.nodes}
    edge_keys: Dict[Tuple[str, str], PointKey] = {}
    for (tensor, reader), spec in placement.edges.items():
        module, index = node_call.get(reader, (None, None))
        key = match_input(onnx_values[tensor], records, module, index) if module is not None else None
        if key is None:
            plan.notes.setdefault(spec.layer or reader, f"its input {tensor} cannot be requantized for it alone")
            continue
        edge_keys[(tensor, reader)] = key
        plan.points[key] = spec
    plan.bias_inputs = _bias_inputs(g, placement, weight_nodes, keys, edge_keys, set(plan.points))
    for node, (key, module) in batchnorms.items():
        source = keys.get(placement.derived.get(g.by_name[node].input[0], g.by_name[node].input[0]))
        if node in placement.integer_nodes and source in plan.points:
            plan.channel_affines[key] = (source, module)
    plan.folded_bn = {conv: f.bn for conv, f in exported.folded.items()}
    for req in requests:
        tensor = placement.moved.get(req.tensor, req.tensor)
        if req.kind == "input" and req.readers and (req.tensor, req.readers[0]) in edge_keys:
            key = edge_keys[(req.tensor, req.readers[0])]
        else:
            source = placement.derived.get(tensor, tensor)
            key = keys.get(tensor) if tensor in placement.requant else keys.get(source)
        if key is not None and key in plan.points:
            plan.serves.setdefault(req.layer, {})[req.kind] = key
    for name, intent in intents.items():
        if intent.weight_bits is None or not is_integer_bits(intent.weight_bits) or name in plan.notes:
            continue
        nodes = [n for c in calls.get(name, []) for n in c.nodes]
        left = [placement.notes[n] for n in nodes if n in placement.notes]
        if left:
            plan.notes[name] = left[0]
    for name, note in plan.notes.items():
        logger.info("layer %s cannot run in integer on %s: %s", name, backend, note)
    logger.info("placement for %s: %d quantized tensors, %d integer nodes", backend, len(plan.points),
                len(placement.integer_nodes))
    return plan


def _batchnorm_calls(g: OnnxGraph, model: nn.Module, keys: Mapping[str, PointKey]) -> Dict[str, Tuple[PointKey, str]]:
    """``{BatchNormalization node: (its output's point key, the BatchNorm module)}`` for the nodes
    that are one call of a BatchNorm module (the integer kernel's bias rounding is simulated
    there); other BatchNormalization nodes cannot be simulated as integer ops."""
    found = {}
    for node in g.nodes:
        key = keys.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        parts = key_module(key) if key else None
        if parts is not None and parts[2] is None and \
                isinstance(model.get_submodule(parts[0]), nn.modules.batchnorm._BatchNorm):
            found[node.name] = (key, parts[0])
    return found


def _bias_inputs(g: OnnxGraph, placement: Placement, weight_nodes: Mapping[str, List[str]],
                 keys: Mapping[str, PointKey], edge_keys: Mapping[Tuple[str, str], PointKey],
                 points: Set[PointKey]) -> Dict[str, PointKey]:
    """``{layer: point}`` for the integer Conv/Gemm layers with a bias: the engine stores that bias
    as int32 codes on the grid ``input_scale * weight_scale`` (ONNX Runtime's QLinearConv and
    QGemm add it in integer; TensorRT gets the same rounded values), so the simulation rounds it
    too. A module called on inputs with different grids gets none (its calls would disagree)."""
    found = {}
    for layer, nodes in weight_nodes.items():
        candidates = set()
        for name in nodes:
            node = g.by_name[name]
            if name not in placement.integer_nodes or node.op_type not in ("Conv", "Gemm") \
                    or len(node.input) < 3 or not node.input[2]:
                candidates.add(None)
                continue
            tensor = node.input[0]
            if (tensor, name) in edge_keys:
                candidates.add(edge_keys[(tensor, name)])
            else:
                key = keys.get(tensor if tensor in placement.requant else placement.derived.get(tensor, tensor))
                candidates.add(key if key in points else None)
        if len(candidates) == 1 and None not in candidates:
            found[layer] = candidates.pop()
    return found


__all__ = ["LayerIntent", "PointPlan", "plan_points"]
