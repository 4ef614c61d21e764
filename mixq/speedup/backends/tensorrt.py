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

Modules: :mod:`.tensorrt_loader` (import, logger), :mod:`.tensorrt_engine` (running),
:mod:`.tensorrt_prepare` / :mod:`.tensorrt_rules` / :mod:`.tensorrt_graph` (CPU preparation and
checks), :mod:`.tensorrt_inspector` (precision report), :mod:`.tensorrt_timing_cache`.

A serialized engine only loads in the TensorRT version (and on the GPU architecture) that
built it, and it is executable code: load only engines you built yourself.
"""
from __future__ import annotations

import logging
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import onnx
import torch

from .base import Backend, BuildOptions, EngineFormatError
from .tensorrt_engine import TensorRTEngine
from .tensorrt_inspector import UNKNOWN, precisions_from_inspector_json
from .tensorrt_loader import (MIN_TENSORRT_MAJOR, import_tensorrt, installed_version, major, recent_errors,
                              trt_logger)
from .tensorrt_prepare import prepare_for_tensorrt
from .tensorrt_rules import TensorRTConformanceError
from .tensorrt_timing_cache import attach_timing_cache, save_timing_cache, timing_cache_path

logger = logging.getLogger(__name__)

__all__ = ["TensorRTBackend", "TensorRTEngine", "TensorRTBuildError", "TensorRTConformanceError",
           "precisions_from_inspector_json", "UNKNOWN", "MIN_TENSORRT_MAJOR"]


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


def _network_flags(trt: Any) -> int:
    """Creation flags for a strongly typed network on TensorRT 10 and 11."""
    if major(trt.__version__) >= 11:
        return 0  # every 11.x network is strongly typed; the old flag is deprecated there
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


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
        import_tensorrt(self._device)

    def version(self) -> str:
        return str(import_tensorrt(self._device).__version__)

    def prepare(self, model: onnx.ModelProto, layer_nodes: Optional[Mapping[str, Sequence[str]]] = None,
                config: Optional[Mapping[str, Any]] = None) -> onnx.ModelProto:
        """The graph TensorRT will parse (biases in float, zero points zero, opset in range),
        checked on the CPU against the installed TensorRT's rules (TensorRT 10.0's without one);
        raises :class:`TensorRTConformanceError` naming config layers (``layer_nodes``) and, with
        the calibration ``config``, the quant type and keys to change."""
        return prepare_for_tensorrt(model, dict(layer_nodes or {}), installed_version(), config)

    def build(self, model: onnx.ModelProto, options: BuildOptions) -> TensorRTEngine:
        trt = import_tensorrt(self._device)
        if options.max_batch < 1:
            raise ValueError(f"BuildOptions.max_batch must be >= 1, got {options.max_batch}")
        model = prepare_for_tensorrt(model, options.extra.get("layer_nodes"), str(trt.__version__),
                                     options.extra.get("calibration"))
        device = self._target()
        log = trt_logger(trt)
        log.errors.clear()
        builder = trt.Builder(log)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, log)
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
                f"TensorRT could not build an engine: {recent_errors(log)} (a larger "
                "BuildOptions.workspace_bytes or a smaller max_batch may help)")
        save_timing_cache(config, cache_path)
        nodes = [n.name for n in model.graph.node if n.op_type != "Constant"]
        return TensorRTEngine(trt, bytes(serialized), device, nodes)

    def deserialize(self, payload: bytes, options: BuildOptions) -> TensorRTEngine:
        trt = import_tensorrt(self._device)
        if not payload:
            raise EngineFormatError("the TensorRT engine payload is empty")
        return TensorRTEngine(trt, bytes(payload), self._target())
