"""The one small interface every inference backend implements.

A backend turns a precision-annotated ONNX model (QuantizeLinear/DequantizeLinear around
int8 layers, Casts around fp16 layers, the rest fp32) into an :class:`Engine`. The shared
speedup code never looks inside a backend; a backend never reinterprets the config.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

if TYPE_CHECKING:
    import torch

PRECISIONS = ("int8", "fp16", "fp32")
UNKNOWN = "unknown"  # a node the backend built but cannot attribute a precision to (never report it fp32)
# narrowest first: a layer spanning several nodes runs at its widest precision
PRECISION_ORDER = {p: i for i, p in enumerate(PRECISIONS + (UNKNOWN,))}


class BackendUnavailable(RuntimeError):
    """The backend's package or device is missing; the message names the fix."""


class EngineFormatError(ValueError):
    """A serialized engine is corrupt, of another backend, or of another version."""


@dataclass
class BuildOptions:
    """What every backend needs to build an engine.

    ``max_batch`` bounds the dynamic batch axis (TensorRT optimization profile);
    ``num_threads`` is the CPU thread count (ONNX Runtime); ``workspace_bytes`` the
    device memory pool limit (TensorRT). ``extra`` holds backend-specific options (TensorRT:
    ``layer_nodes``, the plan's ``{config layer: [node names]}``, and ``calibration``, the
    calibration config, for error messages; ``timing_cache``, see :mod:`.tensorrt_timing_cache`).
    """

    max_batch: int = 128
    opt_batch: int = 32
    num_threads: int = 2
    workspace_bytes: int = 1 << 30
    extra: Dict[str, object] = field(default_factory=dict)


class Engine(abc.ABC):
    """A built, runnable engine."""

    backend: str = ""
    input_names: List[str]
    output_names: List[str]

    @abc.abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Run one batch: float32 arrays in graph-input order -> arrays in graph-output order."""

    @abc.abstractmethod
    def serialize(self) -> bytes:
        """The engine's payload, loadable by the same backend's ``deserialize``."""

    @abc.abstractmethod
    def node_precisions(self) -> Dict[str, str]:
        """Precision that actually runs ('int8'|'fp16'|'fp32') per compute node of the annotated
        graph (keyed by that graph's node name), read from what the backend built."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU); called before reading the clock."""

    def run_torch(self, inputs: Sequence["torch.Tensor"]) -> List["torch.Tensor"]:
        """Run one batch of torch tensors; outputs come back on the first input's device.

        The default goes through :meth:`run` (numpy on the host); a device backend overrides it to
        keep device tensors on the device (no host round trip).
        """
        import torch

        device = inputs[0].device if len(inputs) else torch.device("cpu")
        outputs = self.run([t.detach().cpu().numpy() for t in inputs])
        return [torch.from_numpy(np.ascontiguousarray(o)).to(device) for o in outputs]

    def run_torch_timed(self, inputs: Sequence["torch.Tensor"]) -> Tuple[List["torch.Tensor"], float]:
        """:meth:`run_torch` and its duration in seconds.

        The default is the wall clock around the call and :meth:`synchronize`; a device backend
        measures its own device work instead (CUDA events around its stream's work).
        """
        start = time.perf_counter()
        outputs = self.run_torch(inputs)
        self.synchronize()
        return outputs, time.perf_counter() - start


class Backend(abc.ABC):
    """Factory for engines of one kind."""

    name: str = ""

    @abc.abstractmethod
    def check_available(self) -> None:
        """Raise :class:`BackendUnavailable` naming the fix when the package or device is missing."""

    @abc.abstractmethod
    def version(self) -> str:
        """Version of the runtime library, recorded in saved engines."""

    def prepare(self, model: onnx.ModelProto, layer_nodes: Optional[Mapping[str, Sequence[str]]] = None,
                config: Optional[Mapping[str, Any]] = None) -> onnx.ModelProto:
        """The graph this backend would build from ``model``, checked against the backend's rules
        on the CPU, before any build. ``layer_nodes`` (the plan's ``{config layer: [node names]}``)
        and ``config`` (the calibration config) let errors name config layers and keys. Raises
        ``ValueError`` for a graph the backend cannot build. The default returns ``model``
        unchanged; ``build`` must accept either."""
        return model

    @abc.abstractmethod
    def build(self, model: onnx.ModelProto, options: BuildOptions) -> Engine:
        """Build an engine from a precision-annotated ONNX model."""

    @abc.abstractmethod
    def deserialize(self, payload: bytes, options: BuildOptions) -> Engine:
        """Rebuild an engine from :meth:`Engine.serialize` output (same backend and version)."""
