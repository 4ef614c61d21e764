"""Each integer conv on the ONNX Runtime kernel that runs it faster on this CPU, timed at build time.

ONNX Runtime's x86 QLinearConv has two kernels for int8 weights: with every weight zero point 0
a direct "symmetric" convolution (AVX512-VNNI / AVX-VNNI), with any other zero point im2col and
its integer GEMM, which runs on AMX tiles where the CPU has them. Which one is faster depends on
the CPU, the conv and the threading: on one AMX Xeon (threads spinning during a run, as engines
run) the GEMM ran ResNet-50's 3x3 and deep 1x1 convs up to 2.2x faster and MobileNetV2's
depthwise and pointwise convs 2x slower; with threads sleeping between parallel sections it lost
on most ResNet-50 convs, as it did on another Xeon. Codes ``w`` with zero point 0 and codes
``w - 1`` with zero point -1 are the same weights (symmetric codes lie in [-127, 127], so
``w - 1`` fits in int8), and the integer
accumulation is exact, so both kernels give bit-identical outputs. The builder profiles the
model once in each form with ONNX Runtime's own profiler (per-node kernel times, median over
runs, the two sessions called alternately) and moves a conv to the GEMM form only where it ran
at least 10% faster there: like TensorRT's tactic selection, the engine is tuned to the CPU it
is built on.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

# a conv moves to the GEMM kernel only when it ran at least this much faster there
GEMM_MARGIN = 0.9
_WARMUP = 2
_MIN_RUNS, _MAX_RUNS = 5, 25
_TIME_BUDGET_S = 1.0  # per form, for the timed runs

# (model bytes, a directory) -> a profiling onnxruntime.InferenceSession built as the engine's, which
# writes its optimized graph to directory/optimized.onnx and its profile into the directory
SessionFactory = Callable[[bytes, str], object]


def symmetric_conv_weights(model: onnx.ModelProto) -> Dict[str, str]:
    """``{int8 weight initializer: its zero-point initializer}`` for every Conv weight that is an
    int8 initializer read by one DequantizeLinear alone, with all zero points 0 and codes in
    [-127, 127]: the weights whose kernel the builder may choose."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: Dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            readers[name] += 1
    found = {}
    for conv in model.graph.node:
        dq = producer.get(conv.input[1]) if conv.op_type == "Conv" and len(conv.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        weight, zero_point = inits.get(dq.input[0]), inits.get(dq.input[2])
        if weight is None or zero_point is None or weight.data_type != TensorProto.INT8 or readers[weight.name] != 1:
            continue
        codes = numpy_helper.to_array(weight)
        if codes.size and codes.min() >= -127 and not numpy_helper.to_array(zero_point).any():
            found[weight.name] = zero_point.name
    return found


def with_gemm_weights(model: onnx.ModelProto, weights: Mapping[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` where each of ``weights`` (initializer -> zero point, as
    :func:`symmetric_conv_weights` gives) holds codes - 1 with zero point -1: the same values."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    original = {t.name: t for t in model.graph.initializer}
    zero_point_of = {}
    for tensor in tuned.graph.initializer:
        if tensor.name in weights:
            codes = numpy_helper.to_array(tensor).astype(np.int16) - 1
            tensor.CopyFrom(numpy_helper.from_array(codes.astype(np.int8), tensor.name))
            zero = numpy_helper.to_array(original[weights[tensor.name]])
            zero_point_of[tensor.name] = numpy_helper.from_array(np.full(zero.shape, -1, np.int8),
                                                                 f"{tensor.name}/gemm_zero_point")
    tuned.graph.initializer.extend(zero_point_of.values())
    for node in tuned.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in zero_point_of:
            node.input[2] = zero_point_of[node.input[0]].name
    return tuned


def tuning_feeds(model: onnx.ModelProto, batch: int) -> Optional[Dict[str, np.ndarray]]:
    """Inputs for timing (the first axis at ``batch``; normal noise for float inputs, zeros for
    integer ones: integer kernels take the same time for any codes), or None where an input is
    not a tensor of known rank and type or an axis other than the first has no fixed size."""
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape") \
                or not value.type.tensor_type.elem_type:
            return None
        dims = value.type.tensor_type.shape.dim
        shape = [batch if i == 0 and not d.dim_value else d.dim_value for i, d in enumerate(dims)]
        if any(s <= 0 for s in shape):
            return None
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) \
            else np.zeros(shape, dtype)
    return feeds


def _conv_times(profile_path: str, optimized: onnx.ModelProto) -> Dict[str, float]:
    """Median kernel time (µs) of each QLinearConv in a profile, keyed by its weight initializer."""
    weight_of = {n.name: n.input[3] for n in optimized.graph.node if n.op_type == "QLinearConv"}
    samples: Dict[str, List[float]] = defaultdict(list)
    with open(profile_path) as fh:
        events = json.load(fh)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and name[:-len("_kernel_time")] in weight_of:
            samples[weight_of[name[:-len("_kernel_time")]]].append(float(event["dur"]))
    return {w: float(np.median(v)) for w, v in samples.items()}


def profile_conv_times(forms: Sequence[onnx.ModelProto], make_session: SessionFactory,
                       feeds: Dict[str, np.ndarray]) -> List[Dict[str, float]]:
    """Per form, the median kernel time (µs) of each integer conv by weight initializer, the
    forms' sessions called alternately (a shared machine's load then falls on all of them)."""
    with tempfile.TemporaryDirectory(prefix="mixq-ort-tune-") as tmp:
        sessions, optimized = [], []
        for i, form in enumerate(forms):
            directory = os.path.join(tmp, str(i))
            os.makedirs(directory)
            sessions.append(make_session(form.SerializeToString(), directory))
            optimized.append(onnx.load(os.path.join(directory, "optimized.onnx")))
        start = time.perf_counter()
        for _ in range(_WARMUP):
            for session in sessions:
                session.run(None, feeds)
        per_run = (time.perf_counter() - start) / _WARMUP / len(sessions)
        runs = int(np.clip(_TIME_BUDGET_S / max(per_run, 1e-6), _MIN_RUNS, _MAX_RUNS))
        for _ in range(runs):
            for session in sessions:
                session.run(None, feeds)
        return [_conv_times(session.end_profiling(), opt) for session, opt in zip(sessions, optimized)]


def tune_conv_kernels(model: onnx.ModelProto, make_session: SessionFactory, batch: int) -> onnx.ModelProto:
    """``model`` with each integer conv on the faster of ONNX Runtime's two kernels (see the
    module docstring), timed at ``batch``; unchanged where it has no such conv or
    :func:`tuning_feeds` cannot make its inputs."""
    weights = symmetric_conv_weights(model)
    feeds = tuning_feeds(model, batch) if weights else None
    if feeds is None:
        return model
    try:
        symmetric, gemm = profile_conv_times([model, with_gemm_weights(model, weights)], make_session, feeds)
    except Exception as exc:  # timing only picks kernels: the engine builds without it, as ONNX Runtime would
        logger.warning("could not time ONNX Runtime's conv kernels on synthetic inputs (%s); the engine keeps "
                       "ONNX Runtime's default kernel for every conv", exc)
        return model
    moved = [w for w in faster_on_gemm(symmetric, gemm) if w in weights]  # other convs were not moved to time
    timed = [w for w in weights if w in symmetric and w in gemm]
    before = sum(symmetric[w] for w in timed) / 1e3
    after = sum(gemm[w] if w in moved else symmetric[w] for w in timed) / 1e3
    logger.info("ONNX Runtime conv kernels: %d of %d integer convs run faster on the GEMM kernel on this CPU "
                "(profiled conv time %.2f -> %.2f ms)", len(moved), len(timed), before, after)
    return with_gemm_weights(model, {w: weights[w] for w in moved}) if moved else model


def faster_on_gemm(symmetric: Mapping[str, float], gemm: Mapping[str, float]) -> List[str]:
    """The weights whose conv ran at least ``1 - GEMM_MARGIN`` faster on the GEMM kernel (times of
    both kernels by weight initializer; a conv timed in one form only stays)."""
    return sorted(w for w in symmetric if w in gemm and gemm[w] < GEMM_MARGIN * symmetric[w])


__all__ = ["GEMM_MARGIN", "faster_on_gemm", "profile_conv_times", "symmetric_conv_weights", "tune_conv_kernels",
           "tuning_feeds", "with_gemm_weights"]
