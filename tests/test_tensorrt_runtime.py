"""The TensorRT backend end to end on the CPU: prepare, build, serialize, run, inspect, timing
cache, with every piece of mixq real and only the unavailable ``tensorrt`` module replaced.

``FakeTensorRT`` implements the part of the documented TensorRT 10 Python API the backend calls
(``Builder``, ``OnnxParser``, ``IBuilderConfig`` with ``ITimingCache``, ``Runtime``,
``ICudaEngine``, ``IExecutionContext`` with ``execute_async_v3``, ``EngineInspector``). Its
parser enforces the Q/DQ assertions of onnx-tensorrt's ``QuantDequantLinearHelper`` (INT8-only
DequantizeLinear input, all-zero zero points), its "engine" runs the parsed ONNX graph with ONNX
Runtime reading and writing the buffers at the addresses ``set_tensor_address`` received (host
memory here: the engine is built with ``device='cpu'``), and its inspector writes one layer per
compute node with the ``[ONNX Layer: ...]`` metadata and the formats TensorRT prints (recorded in
tests/data/tensorrt). Nodes listed in ``FakeTensorRT.hidden`` are left out of the inspector
output, as Myelin-fused layers or truncated metadata leave them out.
"""
from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from typing import Dict, List, Optional

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from mixq.models import MnistNet
from mixq.speedup.backends import tensorrt as trt_backend
from mixq.speedup.backends import tensorrt_loader
from mixq.speedup.backends.base import BackendUnavailable, BuildOptions, EngineFormatError
from mixq.speedup.backends.tensorrt import TensorRTBackend, TensorRTBuildError
from mixq.speedup.backends.tensorrt_rules import TensorRTConformanceError
from test_tensorrt_models import MNIST_INT8, MNIST_MIXED, AFFINE, Precision, tensorrt_annotated

MAGIC = b"FAKE-TRT-PLAN\n"
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
       TensorProto.INT32: np.int32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}


def make_fake_tensorrt(version: str = "10.13.0.35") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.parsed: List[onnx.ModelProto] = []
    trt.timing_cache_loads: List[bytes] = []
    trt.builders = 0
    trt.hidden = set()

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class DataType(enum.IntEnum):
        FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64 = range(9)

    _TRT = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF, TensorProto.INT8: DataType.INT8,
            TensorProto.INT32: DataType.INT32, TensorProto.INT64: DataType.INT64}

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1  # TensorRT 10 NvInfer.h: kSTRONGLY_TYPED = 1

    trt.ILogger, trt.DataType = ILogger, DataType
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE")
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED")
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", "ONELINE JSON")

    class ITensor:
        def __init__(self, vi: onnx.ValueInfoProto) -> None:
            self.name = vi.name
            dims = vi.type.tensor_type.shape.dim
            self.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            self.dtype = _TRT[vi.type.tensor_type.elem_type]

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags, self.model = flags, None

        @property
        def num_inputs(self) -> int:
            return len(self.model.graph.input)

        def get_input(self, i: int) -> ITensor:
            return ITensor(self.model.graph.input[i])

    class ParserError:
        def __init__(self, node: onnx.NodeProto, index: int, desc: str) -> None:
            self._node, self._index, self._desc = node, index, desc

        def desc(self): return self._desc
        def node(self): return self._index
        def node_name(self): return self._node.name
        def node_operator(self): return self._node.op_type

    class OnnxParser:
        """onnx-tensorrt's Q/DQ assertions (QuantDequantLinearHelper), the others pass."""

        def __init__(self, network: INetworkDefinition, logger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def parse(self, data: bytes, path: Optional[str] = None) -> bool:
            model = onnx.load_from_string(bytes(data))
            inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
            for i, node in enumerate(model.graph.node):
                if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                    continue
                data_in = inits.get(node.input[0])
                if node.op_type == "DequantizeLinear" and data_in is not None and data_in.dtype != np.int8:
                    self.errors.append(ParserError(node, i, "DequantizeLinear: only activation types allowed as "
                                                            "input to this layer"))
                zp = inits.get(node.input[2]) if len(node.input) > 2 else None
                if zp is not None and np.any(zp):
                    self.errors.append(ParserError(node, i, "Assertion failed: shiftIsAllZeros(zeroPoint): "
                                                            "Non-zero zero point is not supported."))
            self.network.model = model
            trt.parsed.append(model)
            return not self.errors

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self.entries = json.loads(data.decode()) if data else []

        def serialize(self) -> bytes:
            return json.dumps(self.entries).encode()

    class IBuilderConfig:
        def __init__(self) -> None:
            self.pools, self.flags, self.profiles, self.cache = {}, {trt.BuilderFlag.TF32}, [], None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        def set_memory_pool_limit(self, pool, size: int) -> None: self.pools[pool] = size
        def clear_flag(self, flag) -> None: self.flags.discard(flag)
        def add_optimization_profile(self, profile) -> int: self.profiles.append(profile); return 0

        def create_timing_cache(self, data: bytes) -> ITimingCache:
            trt.timing_cache_loads.append(bytes(data))
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache: return self.cache

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, min, opt, max) -> None: self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class Builder:
        def __init__(self, logger) -> None:
            trt.builders += 1

        def create_network(self, flags: int) -> INetworkDefinition: return INetworkDefinition(flags)
        def create_builder_config(self) -> IBuilderConfig: return IBuilderConfig()
        def create_optimization_profile(self) -> IOptimizationProfile: return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[bytes]:
            assert network.flags == 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
            assert trt.BuilderFlag.TF32 not in config.flags
            config.cache.entries.append(network.model.graph.name)  # tactics timed by this build
            profiles = {name: s for p in config.profiles for name, s in p.shapes.items()}
            header = json.dumps({"profiles": profiles}).encode()
            return MAGIC + len(header).to_bytes(4, "little") + header + network.model.SerializeToString()

    class ICudaEngine:
        def __init__(self, model: onnx.ModelProto, profiles: Dict[str, list]) -> None:
            self.model, self.profiles = model, profiles
            self.inputs = {vi.name: ITensor(vi) for vi in model.graph.input}
            self.outputs = {vi.name: ITensor(vi) for vi in model.graph.output}
            self.names = list(self.inputs) + list(self.outputs)

        @property
        def num_io_tensors(self) -> int: return len(self.names)
        def get_tensor_name(self, i: int) -> str: return self.names[i]

        def get_tensor_mode(self, name: str):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str): return {**self.inputs, **self.outputs}[name].dtype
        def get_tensor_shape(self, name: str): return {**self.inputs, **self.outputs}[name].shape
        def get_tensor_profile_shape(self, name: str, profile: int): return [list(s) for s in self.profiles[name]]
        def create_execution_context(self) -> "IExecutionContext": return IExecutionContext(self)
        def create_engine_inspector(self) -> "EngineInspector": return EngineInspector(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name: str, shape) -> bool:
            lo, _, hi = self.engine.profiles.get(name, (self.engine.inputs[name].shape,) * 3)
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str):
            if name in self.shapes:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]
            return tuple(batch if d < 0 else d for d in self.engine.outputs[name].shape)

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            import onnxruntime as ort
            feeds = {}
            for name, shape in self.shapes.items():
                dtype = _NP[self.engine.model.graph.input[0].type.tensor_type.elem_type]
                count = int(np.prod(shape)) * np.dtype(dtype).itemsize
                raw = (ctypes.c_char * count).from_address(self.addresses[name])
                feeds[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            session = ort.InferenceSession(self.engine.model.SerializeToString(), providers=["CPUExecutionProvider"])
            for name, value in zip(self.engine.outputs, session.run(list(self.engine.outputs), feeds)):
                value = np.ascontiguousarray(value)
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    class EngineInspector:
        """One layer per compute node, its DequantizeLinear producers fused in (as TensorRT fuses them)."""

        def __init__(self, engine: ICudaEngine) -> None:
            self.engine, self.execution_context = engine, None

        def get_engine_information(self, fmt) -> str:
            assert fmt == trt.LayerInformationFormat.JSON and self.execution_context is not None
            graph = self.engine.model.graph
            producer = {o: n for n in graph.node for o in n.output}
            types = {vi.name: vi.type.tensor_type.elem_type for vi in
                     onnx.shape_inference.infer_shapes(self.engine.model).graph.value_info}
            types.update({t.name: t.data_type for t in graph.initializer})
            types.update({vi.name: vi.type.tensor_type.elem_type for vi in graph.input})
            layers = []
            for node in graph.node:
                if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.name in trt.hidden:
                    continue
                fused = [producer[i].name for i in node.input if i in producer
                         and producer[i].op_type == "DequantizeLinear"] + [node.name]
                source = producer.get(node.input[0])
                if source is not None and source.op_type == "DequantizeLinear":
                    fmt_in = "Thirty-two wide channel vectorized row major Int8 format"
                elif types.get(node.input[0]) == TensorProto.FLOAT16:
                    fmt_in = "Channel major FP16 format where channel % 8 == 0"
                else:
                    fmt_in = "Row major linear FP32"
                layers.append({"Name": " + ".join(fused), "LayerType": "CaskConvolution",
                               "Inputs": [{"Name": node.input[0], "Location": "Device", "Format/Datatype": fmt_in}],
                               "Outputs": [{"Name": node.output[0], "Location": "Device",
                                            "Format/Datatype": "Row major linear FP32"}],
                               "Metadata": "\x1f".join(f"[ONNX Layer: {n}]" for n in fused)})
            return json.dumps({"Layers": layers, "Bindings": self.engine.names})

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, payload: bytes) -> Optional[ICudaEngine]:
            payload = bytes(payload)
            if not payload.startswith(MAGIC):
                return None
            size = int.from_bytes(payload[len(MAGIC):len(MAGIC) + 4], "little")
            header = json.loads(payload[len(MAGIC) + 4:len(MAGIC) + 4 + size])
            model = onnx.load_from_string(payload[len(MAGIC) + 4 + size:])
            return ICudaEngine(model, {k: [tuple(s) for s in v] for k, v in header["profiles"].items()})

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_loader, "_TRT_LOGGER", None)
    return trt


@pytest.fixture(scope="module")
def mnist_graphs(tmp_path_factory):
    torch.manual_seed(0)
    model = MnistNet().eval()
    out = {}
    for name, config_list in (("int8", MNIST_INT8), ("mixed", MNIST_MIXED)):
        out[name] = tensorrt_annotated(model, (1, 1, 28, 28), Precision(lambda m, c=config_list: c),
                                       tmp_path_factory.mktemp(name))
    return out


def _options(layer_nodes, tmp_path, **extra):
    return BuildOptions(max_batch=8, opt_batch=4, extra={"layer_nodes": layer_nodes,
                                                         "timing_cache": str(tmp_path / "timing.cache"), **extra})


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _inputs(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).normal(size=(batch, 1, 28, 28)).astype(np.float32)


def test_build_run_and_inspect_an_int8_mnist_engine(fake_trt, mnist_graphs, tmp_path):
    annotated, layer_nodes, config = mnist_graphs["int8"]
    engine = TensorRTBackend(device="cpu").build(annotated, _options(layer_nodes, tmp_path, calibration=config))

    parsed = fake_trt.parsed[-1]  # what reached the parser: no int32 DQ, no non-zero zero point
    inits = {t.name: numpy_helper.to_array(t) for t in parsed.graph.initializer}
    qdq = [n for n in parsed.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(not np.any(inits[n.input[2]]) for n in qdq)
    assert all(inits[n.input[0]].dtype == np.int8 for n in qdq if n.input[0] in inits)

    assert engine.input_names == ["input"] and engine.output_names == ["output"]
    for batch in (1, 3, 8):
        x = _inputs(batch)
        (y,) = engine.run([x])
        np.testing.assert_allclose(y, _onnxruntime(annotated, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch between 1 and 8"):
        engine.run([_inputs(9)])
    with pytest.raises(ValueError, match="takes 1 input"):
        engine.run([_inputs(2), _inputs(2)])

    x = torch.from_numpy(_inputs(4))
    (y,) = engine.run_torch([x])
    assert isinstance(y, torch.Tensor) and y.device == x.device and y.shape == (4, 10)
    (y2,), seconds = engine.run_torch_timed([x])
    assert torch.equal(y, y2) and seconds > 0

    precisions = engine.node_precisions()
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert precisions[layer_nodes[layer][0]] == "int8", layer


def test_unmapped_nodes_are_reported_unknown(fake_trt, mnist_graphs, tmp_path):
    annotated, layer_nodes, _ = mnist_graphs["int8"]
    fake_trt.hidden = {layer_nodes["fc1"][0]}  # e.g. inside a Myelin layer with no metadata
    precisions = TensorRTBackend(device="cpu").build(annotated, _options(layer_nodes, tmp_path)).node_precisions()
    assert precisions[layer_nodes["fc1"][0]] == "unknown"
    assert precisions[layer_nodes["conv1"][0]] == "int8"


def test_mixed_precision_engine(fake_trt, mnist_graphs, tmp_path):
    annotated, layer_nodes, _ = mnist_graphs["mixed"]
    engine = TensorRTBackend(device="cpu").build(annotated, _options(layer_nodes, tmp_path))
    x = _inputs(5)
    np.testing.assert_allclose(engine.run([x])[0], _onnxruntime(annotated, x), rtol=1e-4, atol=1e-4)
    precisions = engine.node_precisions()
    assert precisions[layer_nodes["fc1"][0]] == "fp16"
    assert precisions[layer_nodes["conv2"][0]] == "int8"
    last = next(n.name for n in annotated.graph.node if n.output[0] == annotated.graph.output[0].name)
    assert precisions[last] == "fp32"  # fc2 is not configured


def test_serialize_and_deserialize(fake_trt, mnist_graphs, tmp_path):
    annotated, layer_nodes, _ = mnist_graphs["int8"]
    backend = TensorRTBackend(device="cpu")
    engine = backend.build(annotated, _options(layer_nodes, tmp_path))
    again = backend.deserialize(engine.serialize(), BuildOptions())
    x = _inputs(2)
    np.testing.assert_array_equal(again.run([x])[0], engine.run([x])[0])
    with pytest.raises(EngineFormatError, match="rebuild it"):
        backend.deserialize(b"not an engine", BuildOptions())
    with pytest.raises(EngineFormatError, match="empty"):
        backend.deserialize(b"", BuildOptions())


def test_timing_cache_is_written_and_reused(fake_trt, mnist_graphs, tmp_path):
    annotated, layer_nodes, _ = mnist_graphs["int8"]
    backend = TensorRTBackend(device="cpu")
    backend.build(annotated, _options(layer_nodes, tmp_path))
    path = tmp_path / "timing.cache"
    assert fake_trt.timing_cache_loads[-1] == b"" and path.is_file()
    written = path.read_bytes()
    backend.build(annotated, _options(layer_nodes, tmp_path))
    assert fake_trt.timing_cache_loads[-1] == written != b""
    assert len(json.loads(path.read_bytes())) == 2  # the second build added its timings
    backend.build(annotated, _options(layer_nodes, tmp_path, timing_cache=None))
    assert fake_trt.timing_cache_loads[-1] == b""


def test_default_timing_cache_location(fake_trt, mnist_graphs, tmp_path, monkeypatch):
    annotated, layer_nodes, _ = mnist_graphs["int8"]
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXQ_TENSORRT_TIMING_CACHE", raising=False)
    TensorRTBackend(device="cpu").build(annotated, BuildOptions(max_batch=4, opt_batch=2))
    assert [p.name for p in (tmp_path / "cache" / "tensorrt").iterdir()] == ["timing-10.13.0.35-cpu.cache"]


def test_raw_annotated_graph_would_fail_the_parser(fake_trt, mnist_graphs):
    """Without preparation the int32 bias DequantizeLinear reaches the parser and fails it."""
    annotated, _, _ = mnist_graphs["int8"]
    parser = fake_trt.OnnxParser(fake_trt.Builder(None).create_network(0), None)
    assert not parser.parse(annotated.SerializeToString())
    assert any("only activation types" in parser.get_error(i).desc() for i in range(parser.num_errors))


def test_affine_config_fails_before_any_build(fake_trt, tmp_path):
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv2"], **AFFINE}]
    torch.manual_seed(0)
    annotated, layer_nodes, config = tensorrt_annotated(MnistNet().eval(), (1, 1, 28, 28),
                                                        Precision(lambda m: config_list), tmp_path)
    with pytest.raises(TensorRTConformanceError, match="config layer 'conv2' \\(input\\)"):
        TensorRTBackend(device="cpu").build(annotated, _options(layer_nodes, tmp_path, calibration=config))
    assert fake_trt.builders == 0 and fake_trt.parsed == []
    with pytest.raises(TensorRTConformanceError, match="'quant_dtype': 'int'"):
        TensorRTBackend().prepare(annotated, layer_nodes, config)


def test_parser_errors_name_the_node(fake_trt, mnist_graphs, tmp_path, monkeypatch):
    annotated, layer_nodes, _ = mnist_graphs["int8"]
    monkeypatch.setattr(trt_backend, "prepare_for_tensorrt", lambda model, *a, **k: model)  # skip the check
    with pytest.raises(TensorRTBuildError, match="Conv.bias/DequantizeLinear \\(DequantizeLinear\\)"):
        TensorRTBackend(device="cpu").build(annotated, _options(layer_nodes, tmp_path))


@pytest.mark.parametrize("body,expected", [
    ("raise OSError('libnvinfer.so.10: cannot open shared object file')", "cannot be loaded \\(OSError"),
    ("raise RuntimeError('CUDA driver version is insufficient')", "cannot be loaded \\(RuntimeError"),
    ("import tensorrt_libs_that_are_missing", "dependency 'tensorrt_libs_that_are_missing' is missing"),
])
def test_broken_install_is_a_clear_error(tmp_path, monkeypatch, body, expected):
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(BackendUnavailable, match=expected) as err:
        TensorRTBackend().check_available()
    assert "pip install --force-reinstall 'mixq[tensorrt]'" in str(err.value)
    assert TensorRTBackend().prepare  # the CPU check still works without a loadable tensorrt
