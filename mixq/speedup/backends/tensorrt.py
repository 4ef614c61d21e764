"""TensorRT backend: a strongly typed engine built from the precision-annotated ONNX model.

TensorRT 10 and 11 only, through their documented Python API (docs.nvidia.com/deeplearning/
tensorrt, "TensorRT Python API" and the 10.x -> 11.x migration guides):

* prepare (CPU, no ``tensorrt`` needed): :func:`~.tensorrt_prepare.prepare_for_tensorrt` folds
  int32 bias DequantizeLinear nodes into float biases, makes zero points zero where exact, moves
  the opset into the parser's range and runs the conformance checker
  (:mod:`.tensorrt_rules`), so a graph TensorRT would reject fails before any build, naming
  the config layer and the key to change.
* build: ``Builder.create_network`` (strongly typed: the ``STRONGLY_TYPED`` creation flag on
  10.x; 11.x networks are always strongly typed), ``OnnxParser.parse``, ``IBuilderConfig``
  (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``, ``profiling_verbosity =
  DETAILED``, TF32 off so an fp32 layer really runs in fp32, a persistent ``ITimingCache``: see
  :mod:`.tensorrt_timing_cache`), one ``IOptimizationProfile`` for the dynamic batch axis, and
  ``build_serialized_network``. Precision comes only from the graph (Q/DQ pairs for int8,
  Casts for fp16).
* run: ``Runtime.deserialize_cuda_engine``, the name-based I/O tensor API and
  ``execute_async_v3`` on the engine's own non-default ``torch.cuda.Stream`` with torch CUDA
  tensors as buffers (no other CUDA binding needed). :meth:`TensorRTEngine.run_torch` keeps
  CUDA tensors on the device; :meth:`TensorRTEngine.run_torch_timed` times the device work with
  CUDA events.
* report: the engine inspector's JSON, parsed by :mod:`.tensorrt_inspector`; a node no layer
  maps is reported ``'unknown'``, never ``'fp32'``.

A serialized engine only loads in the TensorRT version (and on the GPU architecture) that
built it, and it is executable code: load only engines you built yourself.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import onnx
import torch

from .base import Backend, BackendUnavailable, BuildOptions, Engine, EngineFormatError
from .tensorrt_inspector import UNKNOWN, precisions_from_inspector_json, with_unmapped
from .tensorrt_prepare import prepare_for_tensorrt
from .tensorrt_rules import TensorRTConformanceError
from .tensorrt_timing_cache import attach_timing_cache, save_timing_cache, timing_cache_path

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
_INSTALL_HINT = 'pip install mixq[tensorrt] (from a source checkout: pip install -e ".[tensorrt]")'
_T = TypeVar("_T")

__all__ = ["TensorRTBackend", "TensorRTEngine", "TensorRTBuildError", "TensorRTConformanceError",
           "precisions_from_inspector_json", "UNKNOWN"]


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


# ---------------------------------------------------------------------------------------------
# Loading tensorrt
# ---------------------------------------------------------------------------------------------

def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _load_tensorrt() -> Any:
    """``import tensorrt``; a missing or broken install becomes BackendUnavailable naming the fix."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            raise BackendUnavailable(
                f"the TensorRT backend needs the 'tensorrt' package (TensorRT {MIN_TENSORRT_MAJOR} or newer), "
                f"which is not installed: {_INSTALL_HINT}") from exc
        raise BackendUnavailable(
            f"the 'tensorrt' package is installed but its dependency {exc.name!r} is missing: reinstall it "
            f"with pip install --force-reinstall 'mixq[tensorrt]'") from exc
    except (ImportError, OSError, RuntimeError) as exc:  # e.g. libnvinfer missing, CUDA driver too old
        raise BackendUnavailable(
            f"the 'tensorrt' package is installed but cannot be loaded ({type(exc).__name__}: {exc}); its "
            "libraries must match this machine's CUDA driver: reinstall with pip install --force-reinstall "
            "'mixq[tensorrt]' (or the tensorrt-cu12 / tensorrt-cu13 wheel matching `nvidia-smi`)") from exc
    version = getattr(trt, "__version__", "unknown")
    if _major(version) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {version} is too old: mixq builds strongly typed networks with the "
            f"TensorRT {MIN_TENSORRT_MAJOR}+ API: pip install -U 'mixq[tensorrt]'")
    return trt


def _import_tensorrt(device: Optional[torch.device] = None) -> Any:
    """``tensorrt``, checked usable with buffers on ``device`` (default: a CUDA device)."""
    trt = _load_tensorrt()
    if (device is None or device.type == "cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            "TensorRT needs an NVIDIA GPU and a CUDA build of PyTorch "
            "(torch.cuda.is_available() is False); backend='onnxruntime' runs on CPU")
    return trt


def _installed_version() -> Optional[str]:
    """The installed TensorRT version, or None when it is absent or broken (no GPU needed)."""
    try:
        return str(_load_tensorrt().__version__)
    except BackendUnavailable:
        return None


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


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------

class _Stream:
    """The engine's non-default CUDA stream, with CUDA-event timing. Buffers on the CPU (only a
    stand-in TensorRT accepts them: the CPU tests) get a synchronous host stand-in."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream if self.cuda else 0

    def context(self) -> Any:
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def after_caller(self) -> None:
        """Order this stream after the work the caller queued on its current stream (the inputs)."""
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def before_caller(self, outputs: Sequence[torch.Tensor]) -> None:
        """Order the caller's current stream after this stream's work (the outputs)."""
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for tensor in outputs:
                tensor.record_stream(current)

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()

    def timed(self, work: Callable[[], _T]) -> Tuple[_T, float]:
        """``work()`` and the seconds the stream spent on what it queued (CUDA events)."""
        if not self.cuda:
            start = time.perf_counter()
            result = work()
            return result, time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(self.stream)
        result = work()
        end.record(self.stream)
        end.synchronize()
        return result, begin.elapsed_time(end) / 1e3


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with one execution context and its own CUDA stream. Not
    thread-safe.

    ``device`` is where I/O buffers live: the current CUDA device by default (TensorRT only
    reads device memory; the CPU is accepted for tests with a stand-in ``tensorrt``).
    ``nodes`` are the ONNX node names of the graph it was built from: those the inspector does
    not map are reported ``'unknown'``.
    """

    backend = "tensorrt"

    def __init__(self, trt: Any, payload: bytes, device: Optional[torch.device] = None,
                 nodes: Sequence[str] = ()) -> None:
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
        self._device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._stream = _Stream(self._device)
        self._dtypes = _torch_dtypes(trt)
        self._nodes = list(nodes)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.OUTPUT]

    @property
    def device(self) -> torch.device:
        return self._device

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

    def _enqueue(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Queue input conversion, execution and output allocation on the engine's stream."""
        ctx = self._context
        keep = []  # device inputs stay referenced until the stream has read them
        for name, tensor in zip(self.input_names, inputs):
            tensor = tensor.detach().to(device=self._device, dtype=self._dtype(name)).contiguous()
            if self._stream.cuda:
                tensor.record_stream(self._stream.stream)
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"TensorRT rejected shape {list(tensor.shape)} for input {name!r}")
            ctx.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output {name!r} has data-dependent shape {list(shape)}, which the "
                                   "TensorRT backend does not support")
            tensor = torch.empty(shape, dtype=self._dtype(name), device=self._device)
            ctx.set_tensor_address(name, tensor.data_ptr())
            outputs.append(tensor)
        if not ctx.execute_async_v3(self._stream.handle):
            raise RuntimeError(f"TensorRT execution failed ({_recent_errors(self._logger)})")
        return outputs

    def _validate(self, inputs: Sequence[Any]) -> None:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"this engine takes {len(self.input_names)} input(s) "
                             f"{self.input_names}, got {len(inputs)}")
        for name, tensor in zip(self.input_names, inputs):
            self._check_shape(name, tuple(tensor.shape))  # metadata only: no device-to-host copy

    def run_torch(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Run one batch of torch tensors (any device; CUDA ones are read in place).

        Returns the outputs on the engine's device without waiting for them: the caller's current
        CUDA stream is ordered after the engine's stream, as for any torch operation.
        """
        self._validate(inputs)
        self._stream.after_caller()
        with self._stream.context():
            outputs = self._enqueue(inputs)
        self._stream.before_caller(outputs)
        return outputs

    def run_torch_timed(self, inputs: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], float]:
        """:meth:`run_torch` and the seconds its work took on the engine's stream, measured with
        CUDA events: input copies/casts (none for float32 CUDA inputs) and the engine execution;
        not the host-side validation before them."""
        self._validate(inputs)
        self._stream.after_caller()
        with self._stream.context():
            outputs, seconds = self._stream.timed(lambda: self._enqueue(inputs))
        self._stream.before_caller(outputs)
        return outputs, seconds

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """numpy in, numpy out: copies to the device, executes, copies back (waits for the result)."""
        tensors = []
        for array in inputs:
            array = np.ascontiguousarray(array)
            if not array.flags.writeable:  # torch.from_numpy wants a writeable array
                array = array.copy()
            tensors.append(torch.from_numpy(array))
        outputs = self.run_torch(tensors)
        return [(t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for t in outputs]

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
        """Per ONNX node: 'int8' | 'fp16' | 'fp32' from the inspector, ``'unknown'`` for a node of
        the built graph that no engine layer names (Myelin-fused, truncated metadata)."""
        return with_unmapped(precisions_from_inspector_json(self.inspector_json()), self._nodes)


# ---------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------

class TensorRTBackend(Backend):
    """Builds strongly typed TensorRT engines from the precision-annotated ONNX model.

    ``device``: where engines keep their I/O buffers (default: the current CUDA device).
    """

    name = "tensorrt"

    def __init__(self, device: Union[torch.device, str, None] = None) -> None:
        self._device = torch.device(device) if device is not None else None

    def _target(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cuda", torch.cuda.current_device())

    def check_available(self) -> None:
        _import_tensorrt(self._device)

    def version(self) -> str:
        return str(_import_tensorrt(self._device).__version__)

    def prepare(self, model: onnx.ModelProto, layer_nodes: Optional[Mapping[str, Sequence[str]]] = None,
                config: Optional[Mapping[str, Any]] = None) -> onnx.ModelProto:
        """The graph TensorRT will parse (biases in float, zero points zero, opset in range),
        checked on the CPU against the installed TensorRT's rules (TensorRT 10.0's without one);
        raises :class:`TensorRTConformanceError` naming config layers (``layer_nodes``) and, with
        the calibration ``config``, the quant type and keys to change."""
        return prepare_for_tensorrt(model, dict(layer_nodes or {}), _installed_version(), config)

    def build(self, model: onnx.ModelProto, options: BuildOptions) -> TensorRTEngine:
        trt = _import_tensorrt(self._device)
        if options.max_batch < 1:
            raise ValueError(f"BuildOptions.max_batch must be >= 1, got {options.max_batch}")
        model = prepare_for_tensorrt(model, options.extra.get("layer_nodes"), str(trt.__version__),
                                     options.extra.get("calibration"))
        device = self._target()
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
        cache_path = timing_cache_path(options.extra, str(trt.__version__), _device_name(device))
        attach_timing_cache(config, cache_path)
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
        save_timing_cache(config, cache_path)
        nodes = [n.name for n in model.graph.node if n.op_type != "Constant"]
        return TensorRTEngine(trt, bytes(serialized), device, nodes)

    def deserialize(self, payload: bytes, options: BuildOptions) -> TensorRTEngine:
        trt = _import_tensorrt(self._device)
        if not payload:
            raise EngineFormatError("the TensorRT engine payload is empty")
        return TensorRTEngine(trt, bytes(payload), self._target())
