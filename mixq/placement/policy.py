"""Where quantize/dequantize sit: the backend's placement policy on the fp32 ONNX graph.

The config says *which layers* run at which bits; this module decides *which tensors* carry a
quantization grid so that those layers really run as integer kernels on the backend
(:mod:`.op_rules`), the way ONNX Runtime's QDQ op registry or TensorRT Model Optimizer's rules
own it:

1. the integer region starts at the Conv/Gemm/MatMul nodes whose weights are quantized;
2. it grows through ops the backend runs in integer (Add, Mul, Concat, Sigmoid, pooling...)
   when one of their inputs comes from the region, and through grid-preserving ops (MaxPool,
   Reshape, Flatten...) that sit between region nodes; nodes of layers the config keeps in
   float never join;
3. a ReLU (or Clip from 0) that is the only reader of an integer op's output is absorbed: the
   tensor after it is quantized instead (zero point 0), so the pair is one kernel;
4. every data input of a region node, and every output the backend needs quantized, gets one
   shared grid (*point*), observed by the quantizer; outputs of grid-preserving ops keep their
   input's grid (*derived*, no range of their own); an op whose output range is its own
   (HardSigmoid: [0, 1]) gets that range, fixed, never observed; where the backend wants it, a
   Concat's inputs that only it reads take the Concat output's grid (*shared*);
5. the config's own input/output requests are honoured on top: same tensor, their bits and
   explicit scheme; a request that conflicts with the grid a tensor already has becomes a
   requantization for that reader only (*edge*); a request on a tensor absorbed into a fused
   activation is moved after the activation (as TensorRT does).

Tensors in ``blocked`` cannot be quantized (no torch counterpart to simulate them, or no range):
nodes that would need them leave the region, and the result says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, FrozenSet, Iterable, Optional, Set, Tuple

import onnx

from .onnx_graph import WEIGHTED_OPS, OnnxGraph
from .op_rules import OpRules

DEFAULT_ACTIVATION_BITS = 8


@dataclass(frozen=True)
class PointSpec:
    """How one tensor is quantized: bits, and the scheme/dtype (None: the backend's default)."""

    bits: int = DEFAULT_ACTIVATION_BITS
    scheme: Optional[str] = None
    dtype: Optional[str] = None
    why: str = ""
    layer: Optional[str] = None   # the config layer that asked for it, if one did
    kind: Optional[str] = None    # and for its 'input' or 'output'
    fixed: Optional[Tuple[float, float]] = None  # a range set by the op (HardSigmoid: [0, 1]), never observed

    def same_grid(self, other: "PointSpec", rules: OpRules) -> bool:
        """Whether both quantize on one grid (an unset scheme/dtype is the backend's default)."""
        def grid(spec: "PointSpec") -> tuple:
            return spec.bits, spec.scheme or rules.default_scheme, spec.dtype or rules.default_dtype
        return grid(self) == grid(other)


@dataclass(frozen=True)
class Request:
    """A config layer's explicit input/output quantization of one tensor."""

    layer: str
    kind: str                 # 'input' | 'output'
    tensor: str
    readers: Tuple[str, ...]  # for inputs: the layer's nodes that read the tensor
    spec: PointSpec


@dataclass
class Placement:
    """The tensors to quantize and the nodes that then run in integer."""

    integer_nodes: Set[str] = field(default_factory=set)
    points: Dict[str, PointSpec] = field(default_factory=dict)        # observed tensors
    derived: Dict[str, str] = field(default_factory=dict)             # tensor -> point whose grid it keeps
    edges: Dict[Tuple[str, str], PointSpec] = field(default_factory=dict)  # (tensor, reader) requantized
    requant: Dict[str, PointSpec] = field(default_factory=dict)       # derived tensor requantized after its op
    absorbed: Set[str] = field(default_factory=set)                   # activations fused into the op before
    notes: Dict[str, str] = field(default_factory=dict)               # node -> why it stays float
    moved: Dict[str, str] = field(default_factory=dict)               # request tensor -> tensor it moved to
    shared: Dict[str, str] = field(default_factory=dict)              # Concat input -> the Concat output whose grid it takes


def spatial_mean(g: OnnxGraph, node: onnx.NodeProto) -> bool:
    """ReduceMean over H and W of a 4-D tensor (what GlobalAveragePool computes, flattened
    when the dims are not kept)."""
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.constant(node.input[1])
        axes = None if value is None else [int(v) for v in value.reshape(-1)]
    shape = g.shapes.get(node.input[0])
    if axes is None or not shape or len(shape) != 4:
        return False
    return sorted(a % 4 for a in axes) == [2, 3]


class _Policy:
    def __init__(self, g: OnnxGraph, rules: OpRules, int_nodes: Iterable[str], float_nodes: Iterable[str],
                 requests: Iterable[Request], blocked: FrozenSet[str]) -> None:
        self.g = g
        self.rules = rules
        self.seed = [n for n in int_nodes if n in g.by_name]
        self.float_nodes = set(float_nodes)
        self.requests = list(requests)
        self.blocked = blocked
        self.p = Placement()

    # -- the integer region --------------------------------------------------------------------
    def _constant_data_inputs(self, node: onnx.NodeProto) -> int:
        return sum(1 for i in node.input[:2] if i and not self.g.is_activation(i))

    def _joins(self, node: onnx.NodeProto, region: Set[str], available: Set[str]) -> str:
        """'op' if ``node`` joins the region as an integer op, 'grid' as a grid-preserving op, else ''.

        ``available``: tensors the region already holds quantized (its nodes' inputs and outputs).
        An integer op joins when one of its inputs is available, or its output is (it is quantized
        for its readers anyway, so the op can run on integers before it)."""
        g, rules = self.g, self.rules
        if node.name in region or node.name in self.float_nodes or node.op_type in WEIGHTED_OPS:
            return ""
        inputs = g.activation_inputs(node)
        if not inputs or any(i in self.blocked for i in inputs):
            return ""
        from_region = [i for i in inputs if i in available]
        if not from_region and not (node.op_type not in rules.grid_ops and node.output[0] in available):
            return ""
        if node.op_type in rules.grid_ops:
            if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
                return ""
            return "grid" if inputs[0] in from_region else ""
        if rules.is_integer_op(node, self._constant_data_inputs(node)):
            if node.op_type == "ReduceMean" and not spatial_mean(g, node):
                return ""
            if node.op_type == "BatchNormalization" and len(g.shapes.get(inputs[0]) or ()) != 4:
                return ""
            if node.output[0] in self.blocked:
                return ""
            return "op"
        return ""

    def _grow(self, region: Set[str]) -> Dict[str, str]:
        kinds = {n: "op" for n in region}
        if not self.rules.integer_ops and not self.rules.grid_ops:
            return kinds
        available: Set[str] = set()
        for name in region:
            node = self.g.by_name[name]
            available.update(self.g.activation_inputs(node))
            available.update(o for o in node.output[:1] if node.op_type not in self.rules.float_output_ops)
        changed = True
        while changed:
            changed = False
            for node in reversed(self.g.nodes):  # a grid op's input can carry its output's grid
                if node.op_type in self.rules.grid_ops and node.output[0] in available and node.input[0] not in \
                        available and self.g.is_activation(node.input[0]) and len(self.g.readers(node.input[0])) == 1:
                    available.add(node.input[0])
            for node in self.g.nodes:
                kind = self._joins(node, region, available)
                if kind:
                    region.add(node.name)
                    kinds[node.name] = kind
                    available.update(self.g.activation_inputs(node))
                    available.add(node.output[0])
                    changed = True
        return kinds

    def _prune_grid_tails(self, region: Set[str], kinds: Dict[str, str]) -> None:
        """Drop grid-preserving ops whose output no region node reads (they gain nothing)."""
        changed = True
        while changed:
            changed = False
            for name in [n for n in region if kinds.get(n) == "grid"]:
                out = self.g.by_name[name].output[0]
                if not any(r.name in region for r in self.g.readers(out)):
                    region.discard(name)
                    kinds.pop(name)
                    changed = True

    def _absorb(self, node: onnx.NodeProto) -> Optional[onnx.NodeProto]:
        """The ReLU/Clip(0, ...) that alone reads ``node``'s output and fuses into it, if any."""
        out = node.output[0]
        readers = self.g.readers(out)
        if out in self.g.outputs or len(readers) != 1:
            return None
        act = readers[0]
        if act.op_type not in self.rules.fusable_activations or act.name in self.float_nodes:
            return None
        if act.op_type == "Clip":
            lo, _hi = self.g.clip_bounds(act)
            if lo != 0.0:
                return None
        if act.output[0] in self.blocked:
            return None
        return act

    # -- points --------------------------------------------------------------------------------
    def _place_once(self) -> Optional[Set[str]]:
        """One placement; returns the nodes to force to float when a needed tensor is blocked."""
        g, rules = self.g, self.rules
        region = set(n for n in self.seed if n not in self.float_nodes)
        kinds = self._grow(region)
        self._prune_grid_tails(region, kinds)
        p = Placement()
        out_tensor: Dict[str, str] = {}
        for name in [n for n in g.order if n in region and kinds[n] == "op"]:
            node = g.by_name[name]
            act = self._absorb(node) if rules.fusable_activations else None
            if act is not None:
                p.absorbed.add(act.name)
                out_tensor[name] = act.output[0]
            else:
                out_tensor[name] = node.output[0]
        region |= p.absorbed
        failed: Set[str] = set()

        def need(tensor: str, why: str, node: str, fixed: Optional[Tuple[float, float]] = None) -> None:
            if tensor in p.points or tensor in p.derived:
                return
            if tensor in self.blocked:
                failed.add(node)
                self.p.notes.setdefault(node, f"{why}: {self.blocked_reason(tensor)}")
                return
            p.points[tensor] = PointSpec(why=why, fixed=fixed)

        for name in [n for n in g.order if n in region]:
            node = g.by_name[name]
            kind = kinds.get(name)
            if name in p.absorbed:
                continue
            if kind == "grid":
                src = node.input[0]
                producer = g.producer.get(src)
                if not rules.quantize_outputs and not (producer is not None and kinds.get(producer.name) == "grid"):
                    need(src, f"input of {node.op_type} {name}", name)  # its output keeps this grid
                continue
            for t in g.activation_inputs(node):
                producer = g.producer.get(t)
                if producer is not None and kinds.get(producer.name) == "grid" and producer.name in region:
                    continue  # derived below
                if rules.quantize_outputs or node.op_type in WEIGHTED_OPS:
                    need(t, f"input of {node.op_type} {name}", name)
            if rules.quantize_outputs:
                out = out_tensor[name]
                region_reads = any(r.name in region for r in g.readers(out))
                # a product of two activations has an integer kernel only with its output quantized
                # (QLinearMatMul); with a stored weight it may return float (MatMulIntegerToFloat)
                float_ok = node.op_type in rules.float_output_ops and (
                    node.op_type != "MatMul" or g.weight_initializer(node) is not None)
                if float_ok and not region_reads:
                    continue
                need(out, f"output of {node.op_type} {name}", name, rules.fixed_range(node.op_type))
        if rules.quantize_residual_input:
            self._residual_inputs(region, p, need)
        for name in [n for n in g.order if n in region and kinds.get(n) == "grid" and n not in p.absorbed]:
            node = g.by_name[name]
            src = node.input[0]
            root = p.derived.get(src, src)
            if root in p.points:
                p.derived[node.output[0]] = root
            else:
                failed.add(name)
        if failed:
            return failed
        p.integer_nodes = region
        self.p.integer_nodes, self.p.points, self.p.derived, self.p.absorbed = region, p.points, p.derived, p.absorbed
        return None

    def _residual_inputs(self, region: Set[str], p: Placement, need) -> None:
        """An Add reading a region conv's output gets its other input quantized (TensorRT,
        OpenVINO); with ``quantize_conv_residual``, also when both inputs come from convs (the
        second input: its conv then writes quantized codes and the first conv fuses the Add)."""
        g = self.g
        for node in g.nodes:
            if node.op_type != "Add" or node.name in self.float_nodes:
                continue
            inputs = g.activation_inputs(node)
            if len(inputs) != 2:
                continue
            from_conv = [i for i in inputs if g.producer.get(i) is not None and g.producer[i].name in region
                         and g.producer[i].op_type in WEIGHTED_OPS]
            if len(from_conv) == 1:
                other = inputs[1] if inputs[0] == from_conv[0] else inputs[0]
                need(other, f"residual input of Add {node.name}", node.name)
            elif len(from_conv) == 2 and self.rules.quantize_conv_residual:
                need(inputs[1], f"residual input of Add {node.name}", node.name)

    def blocked_reason(self, tensor: str) -> str:
        return self.blocked_why.get(tensor, "it cannot be quantized")

    # -- requests ------------------------------------------------------------------------------
    def _apply_requests(self) -> None:
        p, g = self.p, self.g
        absorbed_inputs = {g.by_name[a].input[0]: g.by_name[a].output[0] for a in p.absorbed}
        for req in self.requests:
            t = req.tensor
            spec = replace(req.spec, layer=req.layer, kind=req.kind)
            if t in absorbed_inputs and req.kind == "output":
                p.moved[t] = absorbed_inputs[t]
                t = absorbed_inputs[t]
            if t in self.blocked:
                continue
            current = p.points.get(t)
            source = p.points.get(p.derived[t]) if t in p.derived else None
            if current is not None:
                if current.layer is None or current.same_grid(spec, self.rules):
                    fixed = current.fixed if current.same_grid(spec, self.rules) else None
                    p.points[t] = replace(spec, why=current.why or spec.why, fixed=fixed)
                elif req.kind == "input":
                    for reader in req.readers:
                        p.edges[(t, reader)] = spec
                else:
                    p.requant[t] = spec
            elif source is not None:
                if source.same_grid(spec, self.rules):
                    continue
                if req.kind == "input":
                    for reader in req.readers:
                        p.edges[(t, reader)] = spec
                else:
                    p.requant[t] = spec
            else:
                p.points[t] = spec

    def _share_concat_grids(self) -> None:
        """An integer Concat's inputs that only it reads, placed by the policy (no config request),
        take the Concat output's grid instead of a range of their own: the kernel then copies them."""
        p, g = self.p, self.g
        activated = {g.by_name[a].output[0]: g.by_name[a].op_type for a in p.absorbed}
        for node in g.nodes:
            out = node.output[0] if node.output else ""
            if node.op_type != "Concat" or node.name not in p.integer_nodes or out not in p.points \
                    or out in p.requant or p.points[out].fixed:
                continue
            inputs = g.activation_inputs(node)
            # a fused ReLU needs a grid from 0: the Concat's has one only if all its inputs are ReLU outputs
            all_relu = all(activated.get(t) == "Relu" for t in inputs)
            for t in inputs:
                spec = p.points.get(t)
                readers = g.readers(t)
                if spec is None or spec.layer is not None or spec.fixed or t in p.requant or t in g.outputs \
                        or len(readers) != 1 or any(e[0] == t for e in p.edges) or (t in activated and not all_relu):
                    continue
                del p.points[t]
                p.shared[t] = out

    def run(self, blocked_why: Dict[str, str]) -> Placement:
        self.blocked_why = blocked_why
        while True:
            failed = self._place_once()
            if not failed:
                break
            self.float_nodes |= failed
            self.seed = [n for n in self.seed if n not in failed]
        self._apply_requests()
        if self.rules.share_concat_grid:
            self._share_concat_grids()
        for name in self.seed:
            if name not in self.p.integer_nodes:
                self.p.notes.setdefault(name, "it left the integer region")
        return self.p


def place(g: OnnxGraph, rules: OpRules, int_nodes: Iterable[str], float_nodes: Iterable[str],
          requests: Iterable[Request] = (), blocked: Optional[Dict[str, str]] = None) -> Placement:
    """Decide the quantized tensors of ``g`` for ``rules``' backend (see the module docstring).

    ``int_nodes``: weighted nodes whose weights the config quantizes; ``float_nodes``: nodes of
    layers the config keeps in float; ``requests``: the config's explicit activation
    quantization; ``blocked``: tensors that cannot be quantized, with the reason.
    """
    blocked = dict(blocked or {})
    return _Policy(g, rules, int_nodes, float_nodes, requests, frozenset(blocked)).run(blocked)


def readers_by_layer(g: OnnxGraph, nodes: Iterable[str], tensor: str) -> Tuple[str, ...]:
    """The nodes among ``nodes`` that read ``tensor``."""
    names = set(nodes)
    return tuple(r.name for r in g.readers(tensor) if r.name in names)
