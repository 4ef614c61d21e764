"""Graph nodes by module scope: a module's own and descendants' nodes, its matrix products."""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Set

from .onnx_graph import OnnxGraph


def module_tree_nodes(calls: Mapping[str, Sequence[Any]], name: str) -> Set[str]:
    """Nodes of module ``name`` and of every module under it (``calls``: module -> its calls,
    each with ``.nodes``, as :func:`mixq.placement.module_map.module_calls` gives them)."""
    prefix = name + "."
    return {n for module, cs in calls.items() if module == name or module.startswith(prefix) for c in cs for n in c.nodes}


def matmul_nodes(g: OnnxGraph, calls: Mapping[str, Sequence[Any]], scope: str) -> List[str]:
    """The MatMul nodes multiplying two activations (attention's Q K^T, softmax V) computed in
    module ``scope`` or a module under it (everywhere for ``''``), in graph order."""
    inside = None if not scope else module_tree_nodes(calls, scope)
    return [n.name for n in g.nodes if n.op_type == "MatMul" and len(g.activation_inputs(n)) == 2
            and (inside is None or n.name in inside)]
