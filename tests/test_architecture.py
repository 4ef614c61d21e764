"""The package's imports run one way (DESIGN.md section 1): compressor <- placement <- quantizers
<- search <- speedup <- cli, with no cycle between modules. Read from the source, every import
counted (module level or inside a function)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parent.parent / "mixq"
LAYERS = {"atomic_io": 0, "table": 0, "messages": 0, "version": 0, "timing": 0, "compressor": 1, "placement": 2, "quantizers": 3, "search": 4, "speedup": 5,
          "zoo": 6, "datasets": 6, "models": 6, "cli": 7, "__init__": 8}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixq"):
                target, names = node.module, [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                target, names = None, [a.name for a in node.names if a.name.startswith("mixq")]
            else:
                continue
            for name in names + ([target] if target else []):
                if name and name.startswith("mixq"):
                    graph[module].add(name)
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def _existing(name: str, modules: Set[str]) -> str:
    """The module an imported dotted name lives in (``mixq.a.b.func`` -> ``mixq.a.b``)."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def test_no_module_imports_a_higher_layer():
    graph = _imports()
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    upward = sorted(f"{src} -> {_existing(dst, modules)}" for src, dsts in graph.items() for dst in dsts
                    if _layer(_existing(dst, modules)) > _layer(src))
    assert upward == []


def test_no_import_cycle_between_modules():
    graph = _imports()
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    edges = {src: {_existing(d, modules) for d in dsts} - {src} for src, dsts in graph.items()}
    # packages import their own submodules to re-export them; a submodule importing its package is the cycle
    for src in list(edges):
        edges[src] = {d for d in edges[src] if not d.startswith(src + ".")}
    state: Dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
