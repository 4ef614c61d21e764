"""Which ONNX nodes and tensors belong to which torch module (by qualified name).

Both torch exporters record the module scope of every node, in different places:

* TorchScript (``dynamo=False``) names nodes after the scope path, e.g.
  ``/layer1/layer1.0/conv1/Conv``: one component per module call, each the module's name
  relative to an ancestor (``layer1.0``, ``conv1``, ``shortcut.0``); a module called again
  gets a call suffix (``relu_1``).
* dynamo puts the list of qualified module names in the node's metadata
  ``pkg.torch.onnx.name_scopes``, e.g. ``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']``.

Components are resolved against the model's real module tree (a component must name a child
of the module resolved so far, by its full name or a dotted suffix of it), never against node
counters. Repeated calls of one module are told apart by their scope and by connectivity.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import onnx

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_CALL_SUFFIX = re.compile(r"_\d+$")


@dataclass
class ModuleCall:
    """One call of a module in the graph: its nodes and the activation tensors at its boundary."""

    module: str
    nodes: List[str] = field(default_factory=list)
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)


class _ModuleTree:
    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names) | {""}
        self.order = {n: i for i, n in enumerate(names)}
        self.children: Dict[str, List[str]] = defaultdict(list)
        for name in self.names:
            if name:
                self.children[self.parent(name)].append(name)

    def parent(self, name: str) -> str:
        head = name
        while "." in head:
            head = head.rpartition(".")[0]
            if head in self.names:
                return head
        return ""

    def resolve(self, parent: str, component: str) -> Optional[str]:
        """The module under ``parent`` that a scope component names, if exactly one does: a child,
        else the nearest descendant through containers that are never called themselves (the
        blocks of an ``nn.ModuleList`` looped over in ``forward``: ``layer.0`` under ``encoder``)."""
        prefix = f"{parent}." if parent else ""
        for comp in (component, _CALL_SUFFIX.sub("", component)):
            hits = [c for c in self.children.get(parent, []) if c == comp or c.endswith("." + comp)]
            if len(hits) == 1:
                return hits[0]
            deeper = sorted((n for n in self.names if n.startswith(prefix) and n != parent
                             and (n[len(prefix):] == comp or n[len(prefix):].endswith("." + comp))),
                            key=lambda n: self.order.get(n, 0))
            if deeper:
                depth = min(n.count(".") for n in deeper)
                nearest = [n for n in deeper if n.count(".") == depth]
                if len(nearest) == 1:
                    return nearest[0]
                if comp != component:  # 'fc_1': the second call of an 'fc' among same-named modules
                    index = int(component[len(comp) + 1:])
                    return nearest[index] if index < len(nearest) else None
                return nearest[0]
        return None


def _scope_chain(node: onnx.NodeProto, tree: _ModuleTree) -> List[Tuple[str, str]]:
    """``[(module_name, raw_scope_key), ...]`` from the outermost to the innermost module."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            names = [s for s in scopes[1:-1] if s in tree.names and s]
            return [(name, name) for name in names]
    if not node.name.startswith("/"):
        return []
    chain, parent, raw = [], "", ""
    for component in node.name.split("/")[1:-1]:
        child = tree.resolve(parent, component)
        if child is None:
            break
        raw = f"{raw}/{component}"
        chain.append((child, raw))
        parent = child
    return chain


def _split_connected(nodes: List[onnx.NodeProto]) -> List[List[onnx.NodeProto]]:
    """Group nodes into weakly connected components (through tensors they share)."""
    owner = {}
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, node in enumerate(nodes):
        for name in node.output:
            owner[name] = i
    for i, node in enumerate(nodes):
        for name in node.input:
            j = owner.get(name)
            if j is not None:
                parent[find(i)] = find(j)
    groups: Dict[int, List[onnx.NodeProto]] = defaultdict(list)
    for i, node in enumerate(nodes):
        groups[find(i)].append(node)
    return list(groups.values())


def module_calls(model: onnx.ModelProto, module_names: Sequence[str]) -> Dict[str, List[ModuleCall]]:
    """For every module (of ``module_names``) that has nodes, its calls in graph order.

    A call's ``inputs`` are the activation tensors its nodes read from outside (initializers
    and ``Constant`` outputs excluded); its ``outputs`` the tensors read outside it or
    returned by the graph.
    """
    graph = model.graph
    tree = _ModuleTree(module_names)
    constants = {i.name for i in graph.initializer}
    constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    consumers: Dict[str, List[str]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    graph_outputs = {o.name for o in graph.output}

    grouped: Dict[Tuple[str, str], List[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for module, raw in _scope_chain(node, tree):
            grouped[(module, raw)].append(node)

    result: Dict[str, List[ModuleCall]] = defaultdict(list)
    for (module, _raw), nodes in grouped.items():
        for group in _split_connected(nodes):
            compute = [n for n in group if n.op_type != "Constant"]
            if not compute:
                continue
            names = {n.name for n in group}
            produced = {o for n in group for o in n.output}
            call = ModuleCall(module, [n.name for n in compute])
            for n in compute:
                for name in n.input:
                    if name and name not in produced and name not in constants and name not in call.inputs:
                        call.inputs.append(name)
                for name in n.output:
                    outside = any(c not in names for c in consumers.get(name, []))
                    if name and (outside or name in graph_outputs) and name not in call.outputs:
                        call.outputs.append(name)
            result[module].append(call)
    order = {n.name: i for i, n in enumerate(graph.node)}
    for calls in result.values():
        calls.sort(key=lambda c: order[c.nodes[0]])
    return dict(result)
