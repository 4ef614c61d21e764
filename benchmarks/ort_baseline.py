"""ONNX Runtime's own quantization as the reference mixq's engines are measured against.

Importable helpers (``benchmarks/zoo.py`` and the tests use them); nothing here depends on mixq
except the optional ``'mixq'`` timing kind.

* :func:`ort_quantize_static` — ORT ``quantize_static``: QDQ format, per-channel symmetric s8
  weights, u8 activations, MinMax calibration over the given batches (the fastest of ORT's own
  configurations on x86; its defaults, s8 activations, mostly do not fuse into integer kernels).
* :func:`ort_quantize_dynamic` — ORT ``quantize_dynamic`` (s8 weights; for transformers).
* :func:`time_in_subprocess` / :func:`time_rounds` / :func:`time_round_robin` — latency of
  saved engines, each in its own Python process (``intra_op_num_threads`` as given, thread-pool
  spinning off, median of ``runs`` runs after ``warmup``), round-robin over several rounds in
  rotating order: two live sessions on two cores corrupt each other's timings. Each
  engine's best round is the one least disturbed by other load; :func:`paired_ratio` compares
  two engines round by round (the same load on both), which is what the ratio tables use.
* :func:`mac_count`, :func:`optimized_model`, :func:`kernel_summary` — multiply-accumulates per
  Conv/Gemm/MatMul-like node (shapes from ONNX shape inference, or from executing the model),
  the graph ONNX Runtime actually runs, and how many MACs run in integer kernels there.

Run as a script it times one model (``--child``, used by the driver) or compares fp32 against
``quantize_static`` on one saved fp32 ONNX with random calibration data (a smoke check).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from mixq.timing import time_calls

logger = logging.getLogger(__name__)

ModelLike = Union[bytes, str, "os.PathLike[str]", onnx.ModelProto]
Feeds = Union[np.ndarray, Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------

def as_proto(model: ModelLike) -> onnx.ModelProto:
    """``model`` (serialized bytes, a path or a ModelProto) as a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(os.fspath(model))


def as_bytes(model: ModelLike) -> bytes:
    """``model`` serialized."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    with open(os.fspath(model), "rb") as fh:
        return fh.read()


def input_names(model: ModelLike) -> List[str]:
    """Graph inputs that are not initializers."""
    proto = as_proto(model)
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def _feed_dict(model: ModelLike, feeds: Feeds) -> Dict[str, np.ndarray]:
    if isinstance(feeds, np.ndarray):
        names = input_names(model)
        if len(names) != 1:
            raise ValueError(f"the model has inputs {names}; pass feeds as a dict")
        return {names[0]: feeds}
    return dict(feeds)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs its pre-processing advice on the root logger; keep benchmarks' output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------
# ORT's quantizers
# ---------------------------------------------------------------------------------------------

def _reader(model: ModelLike, batches: Sequence[Feeds]):
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        """Feeds the calibration batches once, in order."""

        def __init__(self) -> None:
            self._feeds = iter([_feed_dict(model, b) for b in batches])

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(self._feeds, None)

    return BatchReader()


def preprocess(model: ModelLike) -> bytes:
    """ORT's recommended ``quant_pre_process`` (symbolic + ONNX shape inference, basic graph
    optimizations such as Conv+BN folding)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="mixq-ort-pre-") as tmp:
        out = os.path.join(tmp, "pre.onnx")
        with _quiet_root_logger():
            quant_pre_process(as_proto(model), out)
        with open(out, "rb") as fh:
            return fh.read()


def ort_quantize_static(model: ModelLike, batches: Sequence[Feeds], per_channel: bool = True,
                        activation_u8: bool = True, pre_process: bool = False,
                        nodes_to_exclude: Optional[List[str]] = None,
                        extra_options: Optional[Dict[str, object]] = None) -> bytes:
    """ONNX Runtime ``quantize_static`` of an fp32 model: QDQ, s8 weights (per channel unless told
    otherwise), u8 activations (``QuantType.QUInt8``; ``activation_u8=False`` gives ORT's s8
    default), MinMax calibration over ``batches`` (arrays, or dicts of input name -> array).
    ``pre_process`` runs ORT's ``quant_pre_process`` first. Returns the quantized model bytes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = preprocess(model) if pre_process else as_bytes(model)
    proto = as_proto(source)
    with tempfile.TemporaryDirectory(prefix="mixq-ort-qs-") as tmp:
        out = os.path.join(tmp, "int8.onnx")
        with _quiet_root_logger():
            quantize_static(proto, out, _reader(proto, batches), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel,
                            activation_type=QuantType.QUInt8 if activation_u8 else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=nodes_to_exclude, extra_options=extra_options)
        with open(out, "rb") as fh:
            return fh.read()


def ort_quantize_dynamic(model: ModelLike, per_channel: bool = False,
                         op_types_to_quantize: Optional[List[str]] = None,
                         extra_options: Optional[Dict[str, object]] = None) -> bytes:
    """ONNX Runtime ``quantize_dynamic`` (s8 weights, activations quantized at run time).
    Returns the quantized model bytes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="mixq-ort-qd-") as tmp:
        out = os.path.join(tmp, "dyn.onnx")
        with _quiet_root_logger():
            quantize_dynamic(as_proto(model), out, per_channel=per_channel, weight_type=QuantType.QInt8,
                             op_types_to_quantize=op_types_to_quantize, extra_options=extra_options)
        with open(out, "rb") as fh:
            return fh.read()


# ---------------------------------------------------------------------------------------------
# Sessions and timing
# ---------------------------------------------------------------------------------------------

def make_session(model: ModelLike, threads: int = 2, optimized_path: Optional[str] = None,
                 level: str = "all"):
    """A CPU InferenceSession with ``threads`` intra-op threads, one inter-op thread, threads
    spinning only while a run lasts (as mixq's engines run).
    ``level``: 'disable', 'basic', 'extended' or 'all' (ORT's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: unused-initializer and layout-serialization notices are noise here
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    source = model if isinstance(model, str) else as_bytes(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def run_onnx(model: ModelLike, feeds: Feeds, threads: int = 2) -> List[np.ndarray]:
    """Outputs of ``model`` on ``feeds`` (in-process, for accuracy checks, not for timing)."""
    session = make_session(model, threads)
    return session.run(None, _feed_dict(model, feeds))


def _child(kind: str, path: str, feeds_path: str, runs: int, warmup: int, threads: int,
           min_seconds: float) -> None:
    """Time one engine in this (fresh) process and print one JSON line."""
    with np.load(feeds_path) as data:
        arrays = {k: data[k] for k in data.files}
    if kind == "onnx":
        session = make_session(path, threads)
        names = [i.name for i in session.get_inputs()]
        feed = arrays if set(arrays) == set(names) else dict(zip(names, arrays.values()))
        run = lambda: session.run(None, feed)  # noqa: E731
    elif kind == "openvino":  # an ONNX model compiled by OpenVINO as mixq's OpenVINO backend compiles its own
        import openvino as ov

        from mixq.speedup.backends.base import BuildOptions
        from mixq.speedup.backends.openvino import DEVICE, _config

        compiled = ov.Core().compile_model(path, DEVICE, _config(BuildOptions(num_threads=threads)))
        request, names = compiled.create_infer_request(), [p.get_any_name() for p in compiled.inputs]
        feed = {i: arrays[n] if n in arrays else list(arrays.values())[i] for i, n in enumerate(names)}
        run = lambda: request.infer(feed)  # noqa: E731
    elif kind == "mixq":
        import torch

        from mixq.speedup import ModelSpeedup

        torch.set_num_threads(threads)
        engine = ModelSpeedup.load_quantized_model(path, num_threads=threads)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if engine.io.keyword:  # a dict of named inputs (token ids, attention mask...)
            x = tensors
        elif len(tensors) == 1:
            x = next(iter(tensors.values()))
        else:
            x = tuple(tensors[spec.name] for spec in engine.io.inputs)
        run = lambda: engine.inference(x)  # noqa: E731  (wall clock around the call, copies included)
    else:
        raise ValueError(f"unknown engine kind {kind!r}: 'onnx', 'openvino' or 'mixq'")
    latency = time_calls(run, runs, warmup, min_seconds)
    print(json.dumps({"median_s": latency.median_s, "runs": latency.runs}))


class TimedEngine(NamedTuple):
    """An engine file to time: ``kind`` 'onnx' (an ONNX model, plain ORT session), 'openvino'
    (an ONNX model compiled by OpenVINO with mixq's OpenVINO settings) or 'mixq' (a file from
    ``ModelSpeedup.export_quantized_model``, run through ``engine.inference``)."""

    kind: str
    path: str


def _save_feeds(feeds: Feeds, directory: str) -> str:
    path = os.path.join(directory, "feeds.npz")
    arrays = {"input": feeds} if isinstance(feeds, np.ndarray) else dict(feeds)
    np.savez(path, **arrays)
    return path


def time_in_subprocess(engine: Union[ModelLike, TimedEngine], feeds: Feeds, runs: int = 20, warmup: int = 5,
                       threads: int = 2, min_seconds: float = 1.0, feeds_path: Optional[str] = None) -> float:
    """Median latency in seconds of one engine, timed in a fresh Python process (see module doc).
    A bare model (bytes, proto or ``.onnx`` path) is an 'onnx' engine."""
    with tempfile.TemporaryDirectory(prefix="mixq-time-") as tmp:
        if not isinstance(engine, TimedEngine):
            if isinstance(engine, (str, os.PathLike)):
                engine = TimedEngine("onnx", os.fspath(engine))
            else:
                path = os.path.join(tmp, "model.onnx")
                with open(path, "wb") as fh:
                    fh.write(as_bytes(engine))
                engine = TimedEngine("onnx", path)
        feeds_path = feeds_path or _save_feeds(feeds, tmp)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", engine.kind, os.path.abspath(engine.path),
               feeds_path, "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads),
               "--min-seconds", str(min_seconds)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"timing {engine.path} failed:\n{out.stderr[-4000:]}")
        return float(json.loads(out.stdout.strip().splitlines()[-1])["median_s"])


def time_rounds(engines: Mapping[str, Union[ModelLike, TimedEngine]], feeds: Feeds, rounds: int = 3,
                runs: int = 20, warmup: int = 5, threads: int = 2,
                min_seconds: float = 1.0) -> Dict[str, List[float]]:
    """Median latency (seconds) of each engine in every round: a round times every engine once,
    each in its own process, starting one engine further each round (round ``r`` runs engines
    ``r, r+1, ...`` cyclically). Position matters on a shared machine (an engine timed right
    after a different one measured up to 15% slower than one timed after itself), so every
    engine takes every position and follows every other engine in turn."""
    with tempfile.TemporaryDirectory(prefix="mixq-rr-") as tmp:
        files: Dict[str, Union[str, TimedEngine]] = {}
        for i, (name, engine) in enumerate(engines.items()):
            if isinstance(engine, (TimedEngine, str, os.PathLike)):
                files[name] = engine if isinstance(engine, TimedEngine) else os.fspath(engine)
            else:
                files[name] = os.path.join(tmp, f"engine{i}.onnx")
                with open(files[name], "wb") as fh:
                    fh.write(as_bytes(engine))
        feeds_path = _save_feeds(feeds, tmp)
        latencies: Dict[str, List[float]] = {name: [] for name in files}
        for r in range(rounds):
            names = list(files)
            for name in names[r % len(names):] + names[:r % len(names)]:
                latency = time_in_subprocess(files[name], feeds, runs, warmup, threads, min_seconds, feeds_path)
                latencies[name].append(latency)
                logger.info("round %d: %s %.2f ms", r + 1, name, 1000 * latency)
        return latencies


def time_round_robin(engines: Mapping[str, Union[ModelLike, TimedEngine]], feeds: Feeds, rounds: int = 3,
                     runs: int = 20, warmup: int = 5, threads: int = 2,
                     min_seconds: float = 1.0) -> Dict[str, float]:
    """Best-round median latency (seconds) of each engine (:func:`time_rounds`)."""
    return {name: min(v) for name, v in time_rounds(engines, feeds, rounds, runs, warmup, threads,
                                                     min_seconds).items()}


def time_interleaved(runs: Mapping[str, Callable[[], object]], alternations: int = 40, warmup: int = 3
                     ) -> Dict[str, List[float]]:
    """Seconds of each call when the callables run call by call in this process, rotating which
    goes first: each alternation sees the same machine load for all of them, so per-alternation
    ratios (:func:`paired_ratio`) are the steadiest comparison on a shared machine."""
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(alternations):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[r] / b[r]``: two engines timed in the same round see the same
    machine load, so their ratio is steadier than the ratio of their separate bests."""
    return float(np.median(np.asarray(a, dtype=float) / np.asarray(b, dtype=float)))


# ---------------------------------------------------------------------------------------------
# Multiply-accumulates and the graph ORT runs
# ---------------------------------------------------------------------------------------------

# op type -> (index of the weight / second operand, kind); conv-like: out numel x prod(W.shape[1:]),
# matmul-like: out numel x K (inner dimension, from the first operand)
MAC_OPS: Dict[str, Tuple[int, str]] = {
    "Conv": (1, "conv"), "FusedConv": (1, "conv"), "ConvInteger": (1, "conv"), "QLinearConv": (3, "conv"),
    "ConvTranspose": (1, "convT"),
    "MatMul": (1, "matmul"), "FusedMatMul": (1, "matmul"), "MatMulInteger": (1, "matmul"),
    "MultiHeadAttention": (1, "attention"),
    "QLinearMatMul": (3, "matmul"), "MatMulIntegerToFloat": (1, "matmul"), "DynamicQuantizeMatMul": (1, "matmul"),
    "Gemm": (1, "gemm"), "FusedGemm": (1, "gemm"), "QGemm": (3, "gemm"),
}
# ops whose multiply-accumulates run on integer kernels in ONNX Runtime
INTEGER_MAC_OPS = frozenset({"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
                             "DynamicQuantizeMatMul", "QGemm", "QAttention"})


def _shapes_by_inference(proto: onnx.ModelProto, input_shapes: Optional[Mapping[str, Sequence[int]]]):
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for inp in proto.graph.input:
        if input_shapes and inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1
                                    for d in vi.type.tensor_type.shape.dim)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _shapes_by_execution(proto: onnx.ModelProto, feeds: Feeds) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape from one run with graph optimizations off and every node output exposed."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    feed = _feed_dict(proto, feeds)
    known = {o.name for o in proto.graph.output}
    names = [o for n in proto.graph.node for o in n.output if o and o not in known]
    proto.graph.output.extend([onnx.ValueInfoProto(name=o) for o in names])
    session = make_session(proto, threads=2, level="disable")
    outputs = session.run(None, feed)
    shapes = {o.name: tuple(v.shape) for o, v in zip(session.get_outputs(), outputs) if hasattr(v, "shape")}
    shapes.update({k: tuple(v.shape) for k, v in feed.items()})
    shapes.update({i.name: tuple(i.dims) for i in proto.graph.initializer})
    return shapes


def mac_count(model: ModelLike, feeds: Optional[Feeds] = None,
              input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, int]:
    """Multiply-accumulates per Conv/Gemm/MatMul-like node (float, QDQ and ORT's fused/integer
    forms), keyed by node name (its first output's name when unnamed). Shapes come from running
    the model once on ``feeds`` when given (works on ORT's optimized graphs with contrib ops),
    else from ONNX shape inference (``input_shapes`` fixes symbolic input dims; unknown dims
    count as 1, i.e. per sample)."""
    proto = as_proto(model)
    shapes = _shapes_by_execution(proto, feeds) if feeds is not None else _shapes_by_inference(proto, input_shapes)
    macs: Dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        index, kind = MAC_OPS[node.op_type]
        name = node.name or node.output[0]
        out = shapes.get(node.output[0])
        second = shapes.get(node.input[index]) if len(node.input) > index else None
        first = shapes.get(node.input[0])
        if out is None or second is None or (kind != "conv" and first is None):
            logger.warning("mac_count: no shapes for %s (%s); counted as 0", name, node.op_type)
            macs[name] = 0
            continue
        out_numel = int(np.prod(out))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if kind == "conv":
            macs[name] = out_numel * int(np.prod(second[1:]))
        elif kind == "convT":  # weight (Cin, Cout/g, k...): each input element feeds Cout/g * k outputs
            macs[name] = int(np.prod(first)) * int(np.prod(second[1:]))
        elif kind == "attention":  # Q·Kᵀ and softmax·V over every head: key length x (query + output)
            macs[name] = int(second[1]) * (int(np.prod(first)) + out_numel)
        elif kind == "gemm":
            macs[name] = out_numel * int(first[0] if attrs.get("transA", 0) else first[-1])
        else:
            macs[name] = out_numel * int(first[-1])
    return macs


def optimized_model(model: ModelLike, threads: int = 2, level: str = "all") -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its optimizations (QDQ fusion into QLinearConv etc.)."""
    with tempfile.TemporaryDirectory(prefix="mixq-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, threads, optimized_path=path, level=level)
        return onnx.load(path)


def kernel_summary(model: ModelLike, feeds: Feeds, threads: int = 2, level: str = "extended") -> Dict[str, object]:
    """What ORT runs for ``model``: op-type histogram of the optimized graph, MACs per op type,
    the share of MACs in integer kernels, and the float MAC nodes (name, op, MACs).

    ``level='extended'`` by default: it already has every QDQ fusion (QLinearConv, QGemm, ...);
    ``'all'`` adds only layout changes (NCHWc blocking of float convs, which pads their channels
    and so inflates their MACs, and NHWC integer convs), no change of any kernel's precision."""
    optimized = optimized_model(model, threads, level)
    macs = mac_count(optimized, feeds=feeds)
    op_of = {(n.name or n.output[0]): n.op_type for n in optimized.graph.node}
    histogram: Dict[str, int] = {}
    for node in optimized.graph.node:
        histogram[node.op_type] = histogram.get(node.op_type, 0) + 1
    by_op: Dict[str, int] = {}
    for name, n in macs.items():
        by_op[op_of[name]] = by_op.get(op_of[name], 0) + n
    total = sum(macs.values())
    integer = sum(n for name, n in macs.items() if op_of[name] in INTEGER_MAC_OPS)
    float_nodes = [(name, op_of[name], n) for name, n in macs.items() if op_of[name] not in INTEGER_MAC_OPS]
    return {"ops": dict(sorted(histogram.items())), "macs_by_op": by_op, "total_macs": total,
            "integer_share": integer / total if total else 0.0, "float_mac_nodes": float_nodes}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def per_image_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's outputs (axis 0 is the batch). With random weights a few
    images can have outputs 10-1000x larger than typical (see mixq.zoo), and a cosine over the
    flattened batch is then mostly theirs; the per-image values and their median are not."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "FEEDS"), help=argparse.SUPPRESS)
    parser.add_argument("model", nargs="?", help="an fp32 ONNX model with one float input (smoke comparison)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.child[2], args.runs, args.warmup, args.threads, args.min_seconds)
        return
    if not args.model:
        parser.error("give an fp32 ONNX model")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fp32 = as_bytes(args.model)
    session = make_session(fp32, args.threads)
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    int8 = ort_quantize_static(fp32, batches)
    best = time_round_robin({"fp32": fp32, "ORT quantize_static": int8}, batches[0], args.rounds, args.runs,
                            args.warmup, args.threads, args.min_seconds)
    for name, latency in best.items():
        print(f"{name:24s} {1000 * latency:8.2f} ms")
    print(f"integer MAC share: {kernel_summary(int8, batches[0])['integer_share']:.1%}")


if __name__ == "__main__":
    main()
