"""A deserialized TensorRT engine run on torch tensors: its own non-default CUDA stream, the
name-based I/O tensor API with ``execute_async_v3``, CUDA-event timing, and the per-node
precisions of its inspector (:mod:`.tensorrt_inspector`)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

from .base import Engine, EngineFormatError
from .tensorrt_inspector import precisions_from_inspector_json, with_unmapped
from .tensorrt_loader import recent_errors, trt_logger

_T = TypeVar("_T")


def _torch_dtypes(trt: Any) -> Dict[Any, torch.dtype]:
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
             ("INT8", torch.int8), ("UINT8", torch.uint8), ("INT32", torch.int32),
             ("INT64", torch.int64), ("BOOL", torch.bool)]
    return {getattr(trt.DataType, name): dtype for name, dtype in pairs
            if hasattr(trt.DataType, name)}


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
        self._logger = trt_logger(trt)
        self._logger.errors.clear()
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        try:
            self._engine = self._runtime.deserialize_cuda_engine(payload)
        except (RuntimeError, TypeError, ValueError):  # failure is normally reported as None
            self._engine = None
        if self._engine is None:
            raise EngineFormatError(
                f"this is not an engine TensorRT {trt.__version__} can load on this GPU "
                f"({recent_errors(self._logger)}); engines only load in the TensorRT "
                "version and on the GPU architecture that built them: rebuild it")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context "
                               f"({recent_errors(self._logger)})")
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
            raise RuntimeError(f"TensorRT execution failed ({recent_errors(self._logger)})")
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
