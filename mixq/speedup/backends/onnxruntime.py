"""ONNX Runtime backend (CPU provider): integer kernels from the annotated QDQ graph.

The annotated graph is refined for ONNX Runtime's x86 integer kernels without changing what it
computes (:mod:`.ort_refiner`: u8 activations, ReLUs fused, conv shapes its fast kernels take,
fp16 layers in fp32), and each integer conv is put on whichever of ONNX Runtime's two conv
kernels ran it faster on this CPU (:mod:`.ort_conv_kernels`, timed at build time). The session
runs with an explicit thread count, threads spinning only while a run lasts, and the ONNX
Runtime passes that would reinterpret the graph off (see ``DISABLED_OPTIMIZERS``). The optimized
graph ONNX Runtime actually runs (``optimized_model_filepath``) is read back
(:mod:`.ort_precision`) to report, per node, whether it became an integer kernel or stayed
float. The graph carries inferred shapes
(``value_info``), which ONNX Runtime's fusions and the attention fusion read: float attention
cores become its fused MultiHeadAttention kernel (:mod:`.ort_attention_fusion`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Dict, List, Sequence

import numpy as np
import onnx
from onnx import helper

from .base import Backend, BackendUnavailable, BuildOptions, Engine
from .ort_attention_fusion import FUSED_KEY, fuse_attention
from .ort_conv_kernels import tune_conv_kernels
from .ort_gate_tile import tile_broadcast_gates
from .ort_precision import node_precisions_from_optimized
from .ort_refiner import ABSORBED_KEY, refine_for_onnxruntime

logger = logging.getLogger(__name__)
_MAX_PROTO = 2 ** 31 - 1

# ONNX Runtime passes that would reinterpret the annotated graph: WeightBiasQuantization
# quantizes the float weights of a conv that sits between a DQ and a Q (an fp32 layer of a
# mixed model would silently run int8); Q/DQ propagation moves Qs up through MaxPool onto the
# slow uint8 NCHW pooling kernel (the plan already placed every pair that is exact).
# SkipLayerNormFusion folds a transformer's residual Add into the LayerNormalization after it;
# on int8 BERT its SkipLayerNormalization kernel took 0.94 ms per node against 0.17 ms for the
# LayerNormalization plus ~0.1 ms for the Add it replaces (ONNX Runtime 1.32, batch 8 x 128 x 256,
# 2 threads): the engine ran 20% faster without it.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization", "QDQPropagationTransformer", "SkipLayerNormFusion"]
FP16_REASON = "ONNX Runtime's CPU provider has no fp16 kernels; the layer runs in fp32"


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"ONNX Runtime is not installed ({exc}); pip install onnxruntime") from None
    return onnxruntime


def make_session(model_bytes: bytes, options: BuildOptions, directory: str, profile: bool = False):
    """An ONNX Runtime CPU session as engines run it: explicit thread count, threads spinning
    only during a run, the passes in ``DISABLED_OPTIMIZERS`` off; the optimized graph is written to
    ``directory/optimized.onnx`` and, with ``profile``, the profile into ``directory``."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(options.num_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # threads spin while a run lasts (ONNX Runtime's default: a run hands work to them dozens of
    # times per layer, and waking a sleeping thread each time cost the GEMM kernel 20-40%) and stop
    # when it returns, so an idle engine takes no CPU from other sessions or processes
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3  # the optimized-model dump warns about hardware-specific nodes
    so.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(directory, "profile")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


class OnnxRuntimeEngine(Engine):
    """An ONNX Runtime inference session over the refined annotated graph."""

    backend = "onnxruntime"

    def __init__(self, model_bytes: bytes, options: BuildOptions) -> None:
        self._bytes = model_bytes
        with tempfile.TemporaryDirectory(prefix="mixq-ort-") as tmp:
            self.session = make_session(model_bytes, options, tmp)
            optimized = onnx.load(os.path.join(tmp, "optimized.onnx"))
        refined = onnx.load_from_string(model_bytes)
        self._precisions = node_precisions_from_optimized(refined, optimized)
        props = {p.key: p.value for p in refined.metadata_props}
        for name in json.loads(props.get(ABSORBED_KEY, "[]")):
            self._precisions[name] = "int8"  # a ReLU folded into the integer kernel before it
        for name in json.loads(props.get(FUSED_KEY, "[]")):
            self._precisions[name] = "fp32"  # part of a float MultiHeadAttention kernel
        self.optimized_model = optimized  # the graph ONNX Runtime runs (tests and benchmarks read its kernels)
        self.optimized_op_types = sorted({n.op_type for n in optimized.graph.node})
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        return self.session.run(self.output_names, dict(zip(self.input_names, inputs)))

    def serialize(self) -> bytes:
        return self._bytes

    def node_precisions(self) -> Dict[str, str]:
        return dict(self._precisions)


class OnnxRuntimeBackend(Backend):
    """Builds :class:`OnnxRuntimeEngine` s on the CPU execution provider."""

    name = "onnxruntime"
    fp16_reason = FP16_REASON

    def check_available(self) -> None:
        _import_ort()

    def version(self) -> str:
        return str(_import_ort().__version__)

    def build(self, model: onnx.ModelProto, options: BuildOptions) -> OnnxRuntimeEngine:
        refined, absorbed = refine_for_onnxruntime(model)
        refined, fused = fuse_attention(_with_shapes(refined))
        refined = tile_broadcast_gates(refined)
        refined = tune_conv_kernels(refined, lambda data, tmp: make_session(data, options, tmp, profile=True),
                                    options.opt_batch)
        helper.set_model_props(refined, {**{p.key: p.value for p in refined.metadata_props},
                                         ABSORBED_KEY: json.dumps(absorbed), FUSED_KEY: json.dumps(fused)})
        return OnnxRuntimeEngine(refined.SerializeToString(), options)

    def deserialize(self, payload: bytes, options: BuildOptions) -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(payload, options)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its intermediate shapes inferred, or as it is where inference fails or the
    graph is too large for in-memory inference."""
    if model.ByteSize() >= _MAX_PROTO:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shapes only enable fusions: the engine runs without them
        logger.info("shape inference failed on the engine graph (%s); building without inferred shapes", exc)
        return model
