"""TensorRT backend: a strongly typed engine built from the precision-annotated ONNX model.

TensorRT 10 and 11 only, through their documented Python API (docs.nvidia.com/deeplearning/
tensorrt, "TensorRT Python API" and the 10.x -> 11.x migration guides):

* build: ``Builder.create_network`` (strongly typed: the ``STRONGLY_TYPED`` creation flag on
  10.x; 11.x networks are always strongly typed), ``OnnxParser.parse``, ``IBuilderConfig``
  (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``, ``profiling_verbosity =
  DETAILED``), one ``IOptimizationProfile`` for the dynamic batch axis, and
  ``build_serialized_network``. Precision comes only from the graph (Q/DQ pairs for int8,
  Casts for fp16); TF32 is switched off so that an fp32 layer really runs in fp32.
* run: ``Runtime.deserialize_cuda_engine``, the name-based I/O tensor API (``num_io_tensors``,
  ``get_tensor_name/mode/dtype/shape``, ``set_input_shape``, ``set_tensor_address``) and
  ``execute_async_v3`` on a non-default ``torch.cuda.Stream`` with torch CUDA tensors as
  buffers, so no other CUDA binding is needed.
* report: ``ICudaEngine.create_engine_inspector().get_engine_information(JSON)``, parsed by
  :func:`precisions_from_inspector_json` (pure, testable without a GPU).

A serialized engine only loads in the TensorRT version (and on the GPU architecture) that
built it, and it is executable code: load only engines you built yourself.
"""
from __future__ import annotations

import collections
import json
import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch

from .base import Backend, BackendUnavailable, BuildOptions, Engine, EngineFormatError

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
_INSTALL_HINT = "pip install mixq[tensorrt]"
_ORDER = {"int8": 0, "fp16": 1, "fp32": 2}
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# Layers that only move data between layouts / streams: they carry no compute precision.
_DATA_MOVEMENT_LAYER_TYPES = {"reformat", "noop", "signal", "wait"}


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


# ---------------------------------------------------------------------------------------------
# Per-layer precision from the engine inspector's JSON (pure functions)
# ---------------------------------------------------------------------------------------------

def _precision_of_type(text: str) -> Optional[str]:
    """'int8' | 'fp16' | 'fp32' for a TensorRT data type or format description, else None.

    Accepts the plain type names (``Int8``, ``UInt8``, ``Half``, ``BFloat16``, ``Float``) and
    the long format strings (``Thirty-two wide channel vectorized row major Int8 format``,
    ``Channel major FP16 format where channel % 8 == 0``, ``Row major linear FP32``).
    Integer index types (Int32/Int64), Bool and FP8/FP4 give None. BFloat16 counts as 'fp16'
    (a 16-bit float; the report has no separate bf16 entry).
    """
    low = text.lower()
    if re.search(r"\bu?int8\b", low):
        return "int8"
    if re.search(r"\b(half|fp16|b?float16|bf16)\b", low):
        return "fp16"
    if re.search(r"\b(float|fp32)\b", low):
        return "fp32"
    return None


def _tensor_precision(tensor: Dict[str, Any]) -> Optional[str]:
    """Precision of one tensor entry of a layer's ``Inputs``/``Outputs``.

    TensorRT 10 writes one combined ``"Format/Datatype"`` string; TensorRT 11 splits it into
    ``"DataType"`` and ``"Format"``. The explicit data type wins when present.
    """
    for key in ("DataType", "Format/Datatype", "Format/DataType", "Format"):
        value = tensor.get(key)
        if isinstance(value, str):
            found = _precision_of_type(value)
            if found is not None:
                return found
    return None


def _layer_precision(layer: Dict[str, Any]) -> Optional[str]:
    """The precision a layer computes in.

    That of its first input with a float/int8 type (shape tensors and booleans are skipped),
    narrowed by the type of its embedded ``Weights`` when those are narrower: a convolution
    that reads fp32 and converts it itself (a fused Cast) still runs on fp16 weights.
    """
    found = None
    for tensor in layer.get("Inputs") or []:
        if isinstance(tensor, dict):
            found = _tensor_precision(tensor)
            if found is not None:
                break
    weights = layer.get("Weights")
    if found is not None and isinstance(weights, dict) and isinstance(weights.get("Type"), str):
        weight_precision = _precision_of_type(weights["Type"])
        if weight_precision is not None and _ORDER[weight_precision] < _ORDER[found]:
            found = weight_precision
    return found


def _layer_onnx_nodes(layer: Dict[str, Any]) -> List[str]:
    """ONNX node names fused into one engine layer.

    The ONNX parser records them in ``Metadata`` as ``[ONNX Layer: <node name>]`` entries,
    separated by ASCII unit/record separators when several nodes were fused. Without
    metadata the layer name itself is used: fused layers are named ``"a + b + c"``.
    """
    metadata = layer.get("Metadata")
    if isinstance(metadata, str):
        names = _ONNX_LAYER.findall(metadata)
        if names:
            return [n.strip() for n in names]
    name = layer.get("Name")
    if not isinstance(name, str):
        return []
    return [part.strip() for part in name.split(" + ") if part.strip()]


def _is_data_movement(layer: Dict[str, Any]) -> bool:
    layer_type = str(layer.get("LayerType", "")).lower()
    name = str(layer.get("Name", ""))
    return layer_type in _DATA_MOVEMENT_LAYER_TYPES or name.startswith("Reformatting CopyNode")


def precisions_from_inspector_json(text: str) -> Dict[str, str]:
    """Map ONNX node name -> 'int8' | 'fp16' | 'fp32' from ``get_engine_information(JSON)``.

    The engine must have been built with ``ProfilingVerbosity.DETAILED`` (otherwise
    ``Layers`` holds bare names and this raises ``ValueError``). Each compute layer's
    precision (:func:`_layer_precision`) goes to every ONNX node fused into the layer;
    reformat/no-op layers are skipped. A node that appears in several layers gets the widest
    precision among them, so it is reported 'int8' only if all of it ran in int8.
    """
    try:
        # TensorRT may write the metadata separators as raw control characters.
        info = json.loads(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"engine inspector output is not valid JSON: {exc}") from exc
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise ValueError("engine inspector output has no 'Layers' list")
    if layers and not all(isinstance(layer, dict) for layer in layers):
        raise ValueError(
            "engine inspector reports layer names only: the engine was built without "
            "ProfilingVerbosity.DETAILED, so per-layer precisions are unknown; rebuild it")
    result: Dict[str, str] = {}
    for layer in layers:
        if _is_data_movement(layer):
            continue
        precision = _layer_precision(layer)
        if precision is None:
            continue
        for node in _layer_onnx_nodes(layer):
            old = result.get(node)
            if old is None or _ORDER[precision] > _ORDER[old]:
                result[node] = precision
    return result


# ---------------------------------------------------------------------------------------------
# TensorRT runtime helpers (import tensorrt lazily)
# ---------------------------------------------------------------------------------------------

def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _import_tensorrt() -> Any:
    """Import ``tensorrt`` and check that it is usable here, or raise BackendUnavailable."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"the TensorRT backend needs the 'tensorrt' package (TensorRT "
            f"{MIN_TENSORRT_MAJOR} or newer), which is not installed: {_INSTALL_HINT}") from exc
    version = getattr(trt, "__version__", "unknown")
    if _major(version) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {version} is too old: mixq builds strongly typed networks with the "
            f"TensorRT {MIN_TENSORRT_MAJOR}+ API: pip install -U 'mixq[tensorrt]'")
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "TensorRT needs an NVIDIA GPU and a CUDA build of PyTorch "
            "(torch.cuda.is_available() is False); backend='onnxruntime' runs on CPU")
    return trt


_TRT_LOGGER = None


def _trt_logger(trt: Any) -> Any:
    """One process-wide ``trt.ILogger`` forwarding to :mod:`logging` and keeping recent errors.

    TensorRT keeps the first logger it is given for the whole process, so one instance is
    shared by every builder and runtime and lives as long as the module.
    """
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        severity = trt.ILogger.Severity
        levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
                  severity.WARNING: logging.WARNING, severity.INFO: logging.INFO,
                  severity.VERBOSE: logging.DEBUG}

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: collections.deque = collections.deque(maxlen=20)

            def log(self, sev: Any, msg: str) -> None:
                level = levels.get(sev, logging.INFO)
                if level >= logging.ERROR:
                    self.errors.append(msg)
                if logger.isEnabledFor(level):
                    logger.log(level, "TensorRT: %s", msg)

        _TRT_LOGGER = _Logger()
    return _TRT_LOGGER


def _recent_errors(trt_logger: Any) -> str:
    return "; ".join(trt_logger.errors) if trt_logger.errors else "no error was logged"


def _network_flags(trt: Any) -> int:
    """Creation flags for a strongly typed network on TensorRT 10 and 11."""
    if _major(trt.__version__) >= 11:
        return 0  # every 11.x network is strongly typed; the old flag is deprecated there
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _torch_dtypes(trt: Any) -> Dict[Any, torch.dtype]:
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
             ("INT8", torch.int8), ("UINT8", torch.uint8), ("INT32", torch.int32),
             ("INT64", torch.int64), ("BOOL", torch.bool)]
    return {getattr(trt.DataType, name): dtype for name, dtype in pairs
            if hasattr(trt.DataType, name)}


def _parser_errors(parser: Any) -> List[str]:
    messages = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node_name() or f"#{err.node()}"
        messages.append(f"node {node} ({err.node_operator()}): {err.desc()}")
    return messages


def _batch_profile(shape: Tuple[int, ...], name: str, options: BuildOptions
                   ) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """(min, opt, max) shapes for an input whose only dynamic axis is the batch, else None."""
    if not any(d < 0 for d in shape):
        return None
    if len(shape) == 0 or any(d < 0 for d in shape[1:]):
        raise TensorRTBuildError(
            f"input {name!r} has shape {list(shape)}: only the batch axis (axis 0) may be "
            "dynamic; export the model with fixed non-batch dimensions")
    rest = tuple(shape[1:])
    opt = min(max(1, options.opt_batch), options.max_batch)
    return (1,) + rest, (opt,) + rest, (options.max_batch,) + rest


# ---------------------------------------------------------------------------------------------
# Engine and backend
# ---------------------------------------------------------------------------------------------

class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with one execution context and its own CUDA stream.

    ``run`` copies the numpy inputs to the GPU, executes, and copies the outputs back, all
    on the engine's stream; it returns after the results are on the host. Not thread-safe.
    """

    backend = "tensorrt"

    def __init__(self, trt: Any, payload: bytes) -> None:
        self._trt = trt
        self._logger = _trt_logger(trt)
        self._logger.errors.clear()
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        try:
            self._engine = self._runtime.deserialize_cuda_engine(payload)
        except (RuntimeError, TypeError, ValueError):  # failure is normally reported as None
            self._engine = None
        if self._engine is None:
            raise EngineFormatError(
                f"this is not an engine TensorRT {trt.__version__} can load on this GPU "
                f"({_recent_errors(self._logger)}); engines only load in the TensorRT "
                "version and on the GPU architecture that built them: rebuild it")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context "
                               f"({_recent_errors(self._logger)})")
        self._payload = bytes(payload)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self._device)
        self._dtypes = _torch_dtypes(trt)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.OUTPUT]

    def _dtype(self, name: str) -> torch.dtype:
        trt_dtype = self._engine.get_tensor_dtype(name)
        if trt_dtype not in self._dtypes:
            raise TypeError(f"I/O tensor {name!r} has TensorRT type {trt_dtype}, which mixq "
                            "cannot exchange with torch")
        return self._dtypes[trt_dtype]

    def _profile(self, name: str) -> Tuple[Tuple[int, ...], ...]:
        """(min, opt, max) shapes an input accepts (all equal for a static input)."""
        shape = tuple(self._engine.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return shape, shape, shape
        return tuple(tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))

    def _check_shape(self, name: str, shape: Tuple[int, ...]) -> None:
        expected = tuple(self._engine.get_tensor_shape(name))
        lo, _, hi = self._profile(name)
        ok = len(shape) == len(expected) and all(
            e < 0 or e == s for e, s in zip(expected, shape))
        ok = ok and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if not ok:
            batch = f"the batch between {lo[0]} and {hi[0]} (BuildOptions.max_batch)" if lo \
                else "a scalar"
            raise ValueError(f"input {name!r} has shape {list(shape)}; this engine accepts "
                             f"{list(expected)} (-1 = batch) with {batch}")

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"this engine takes {len(self.input_names)} input(s) "
                             f"{self.input_names}, got {len(inputs)}")
        ctx = self._context
        with torch.cuda.stream(self._stream):
            keep = []  # the device inputs must stay alive until the outputs are copied back
            for name, array in zip(self.input_names, inputs):
                array = np.ascontiguousarray(array)
                self._check_shape(name, tuple(array.shape))
                if not array.flags.writeable:  # torch.from_numpy wants a writeable array
                    array = array.copy()
                tensor = torch.from_numpy(array).to(self._device, dtype=self._dtype(name))
                if not ctx.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"TensorRT rejected shape {list(tensor.shape)} for "
                                     f"input {name!r}")
                ctx.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            outputs = []
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name!r} has data-dependent shape "
                                       f"{list(shape)}, which the TensorRT backend does not "
                                       "support")
                tensor = torch.empty(shape, dtype=self._dtype(name), device=self._device)
                ctx.set_tensor_address(name, tensor.data_ptr())
                outputs.append(tensor)
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed ({_recent_errors(self._logger)})")
            # .cpu() is queued on this stream and waits for it, so the results are complete.
            return [(t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
                    for t in outputs]

    def synchronize(self) -> None:
        self._stream.synchronize()

    def serialize(self) -> bytes:
        return self._payload

    def inspector_json(self) -> str:
        """The engine inspector's JSON description of every layer (``LayerInformationFormat
        .JSON``), with concrete shapes: the execution context is attached with every input
        set to its optimization-profile 'opt' shape (without it, dynamic tensors show no
        format or data type)."""
        for name in self.input_names:
            self._context.set_input_shape(name, self._profile(name)[1])
        inspector = self._engine.create_engine_inspector()
        # 'execution_context' in the TensorRT 10.x/11.x bindings; 'context' in early ones.
        attr = "execution_context" if hasattr(inspector, "execution_context") else "context"
        setattr(inspector, attr, self._context)
        return inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)

    def node_precisions(self) -> Dict[str, str]:
        return precisions_from_inspector_json(self.inspector_json())


class TensorRTBackend(Backend):
    """Builds strongly typed TensorRT engines from the precision-annotated ONNX model."""

    name = "tensorrt"

    def check_available(self) -> None:
        _import_tensorrt()

    def version(self) -> str:
        return str(_import_tensorrt().__version__)

    def build(self, model: onnx.ModelProto, options: BuildOptions) -> TensorRTEngine:
        trt = _import_tensorrt()
        if options.max_batch < 1:
            raise ValueError(f"BuildOptions.max_batch must be >= 1, got {options.max_batch}")
        trt_logger = _trt_logger(trt)
        trt_logger.errors.clear()
        builder = trt.Builder(trt_logger)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse(model.SerializeToString()):
            raise TensorRTBuildError("TensorRT could not parse the ONNX model: "
                                     + "; ".join(_parser_errors(parser) or ["unknown error"]))

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers run in true fp32
        profile = builder.create_optimization_profile()
        dynamic = False
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shapes = _batch_profile(tuple(tensor.shape), tensor.name, options)
            if shapes is not None:
                profile.set_shape(tensor.name, *shapes)
                dynamic = True
        if dynamic:
            config.add_optimization_profile(profile)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTBuildError(
                f"TensorRT could not build an engine: {_recent_errors(trt_logger)} (a larger "
                "BuildOptions.workspace_bytes or a smaller max_batch may help)")
        return TensorRTEngine(trt, bytes(serialized))

    def deserialize(self, payload: bytes, options: BuildOptions) -> TensorRTEngine:
        trt = _import_tensorrt()
        if not payload:
            raise EngineFormatError("the TensorRT engine payload is empty")
        return TensorRTEngine(trt, bytes(payload))
