"""From a checked engine file to a running engine: every failure an :class:`EngineFormatError`.

The payload is the backend's (an ONNX model for ONNX Runtime, a serialized plan for
TensorRT). Before the backend sees an ONNX payload, it must parse and keep every tensor
inside the file: ONNX Runtime would open an initializer's ``external_data`` location relative
to the process's working directory, and mixq never writes one. Whatever the backend then
rejects (junk, a custom domain, a wrong opset, an engine for another GPU) is reported with the
file named, never as the backend's own exception type.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .backends.base import Backend, BuildOptions, Engine, EngineFormatError
from .engine_meta import REBUILD


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[Tuple[str, onnx.TensorProto]]:
    for t in graph.initializer:
        yield f"{where}initializer {t.name!r}", t
    for s in graph.sparse_initializer:
        yield f"{where}sparse initializer {s.values.name!r}", s.values
        yield f"{where}sparse initializer {s.indices.name!r}", s.indices
    yield from _node_tensors(graph.node, where)


def _node_tensors(nodes: Sequence[onnx.NodeProto], where: str) -> Iterator[Tuple[str, onnx.TensorProto]]:
    for node in nodes:
        for a in node.attribute:
            at = f"{where}attribute {a.name!r} of node {node.name or node.op_type!r}"
            if a.HasField("t"):
                yield at, a.t
            yield from ((at, t) for t in a.tensors)
            if a.HasField("sparse_tensor"):
                yield at, a.sparse_tensor.values
            if a.HasField("g"):
                yield from _graph_tensors(a.g, f"{at}: ")
            for g in a.graphs:
                yield from _graph_tensors(g, f"{at}: ")


def onnx_tensors(model: onnx.ModelProto) -> Iterator[Tuple[str, onnx.TensorProto]]:
    """Every tensor stored in ``model`` (initializers, constants, subgraphs, functions), with where it sits."""
    yield from _graph_tensors(model.graph, "")
    for f in model.functions:
        yield from _node_tensors(f.node, f"function {f.name!r}: ")


def check_onnx_payload(payload: bytes, path: str) -> None:
    """The payload parses as ONNX and references no external data."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise EngineFormatError(f"{path}: its payload is not an ONNX model ({exc}); {REBUILD}") from None
    if not model.graph.node:
        raise EngineFormatError(f"{path}: its payload is not an ONNX model (no graph nodes); {REBUILD}")
    for where, tensor in onnx_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise EngineFormatError(f"{path}: {where} of its ONNX payload points to external data outside the file; "
                                    f"mixq engines hold all their weights, so this file was not written by mixq: "
                                    f"{REBUILD}")


def load_engine(backend: Backend, meta: Dict[str, Any], payload: bytes, options: BuildOptions, path: str,
                warm_up: List[np.ndarray]) -> Engine:
    """The backend's engine of a checked file (``meta`` from :func:`~.engine_file.read_engine_file`),
    run once on ``warm_up`` (one sample: a file must not choose how much memory loading takes)."""
    if meta["backend_version"] != backend.version():
        raise EngineFormatError(f"{path} was built with {meta['backend']} {meta['backend_version']}, this is "
                                f"{backend.version()}: {REBUILD}")
    if meta["backend"] == "onnxruntime":
        check_onnx_payload(payload, path)
    expected = len(meta["io"]["output_names"] if "io" in meta else meta["output_names"])
    try:
        engine = backend.deserialize(payload, options)
        outputs = engine.run(warm_up)
        engine.synchronize()
        if len(outputs) != expected:
            raise EngineFormatError(f"its engine returns {len(outputs)} outputs, meta.json names {expected}; "
                                    f"the file is damaged or was not written by mixq: {REBUILD}")
    except EngineFormatError as exc:
        raise EngineFormatError(f"{path}: {exc}") from None
    except MemoryError:
        raise EngineFormatError(f"{path}: not enough memory to load its {meta['backend']} engine") from None
    except Exception as exc:  # the backend's own types (ONNX Runtime's InvalidProtobuf, Fail, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineFormatError(f"{path}: {meta['backend']} cannot load its payload ({reason[:300]}); the file is "
                                f"damaged or was not written by mixq: {REBUILD}") from None
    return engine
