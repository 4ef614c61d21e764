"""TensorRT backend: pure parts on CPU, engine behaviour on an NVIDIA GPU.

CPU tests cover the engine-inspector JSON parsing, the BackendUnavailable messages, the
network flags / optimization profile arithmetic, the ONNX fixtures (against numpy, and against
the TensorRT conformance checker) and the absence of removed TensorRT APIs. Tests marked
``tensorrt`` need the ``tensorrt`` package and a CUDA device and skip with the reason
otherwise. The rest of the backend runs on the CPU in test_tensorrt_runtime.py (a stand-in
``tensorrt`` module), test_tensorrt_rules.py, test_tensorrt_prepare.py, test_tensorrt_models.py
and test_tensorrt_inspector.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mixq.speedup.backends import tensorrt as trt_backend
from mixq.speedup.backends.base import BackendUnavailable, BuildOptions, EngineFormatError
from mixq.speedup.backends.tensorrt import (TensorRTBackend, TensorRTBuildError, TensorRTConformanceError,
                                            precisions_from_inspector_json)

# ---------------------------------------------------------------------------------------------
# Realistic engine-inspector output, written from the documented format:
# * TensorRT "Engine Tools and Debugging" (Engine Inspector): get_engine_information(JSON)
#   returns {"Layers": [...], ...}; with ProfilingVerbosity.DETAILED every layer is an object
#   (Name, LayerType, Inputs/Outputs with Name/Location/Dimensions and the format/data type,
#   layer parameters, TacticName, Metadata); with LAYER_NAMES_ONLY "Layers" is a list of names.
# * TensorRT 11 "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x": "Bindings" (a
#   list of names) is replaced by "I/O Tensors" (objects with Name, IOMode, DataType, ...),
#   and the combined "Format/Datatype" field is split into "DataType" and "Format".
# * Format strings follow the TensorFormat descriptions (LINEAR "Row major linear", CHW32
#   "Thirty-two wide channel vectorized row major" bound to INT8, HWC8 "Channel major" bound
#   to FP16) as printed by trtexec --exportLayerInfo; Myelin ("kgen") layers print the bare
#   type name. The ONNX parser records fused ONNX nodes in Metadata as "[ONNX Layer: name]",
#   separated by ASCII unit separators (0x1F).
# ---------------------------------------------------------------------------------------------

US = "\x1f"


def _t(name, dims, fmt):
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": fmt}


TRT10_DETAILED = {
    "Layers": [
        {"Name": "x_q", "LayerType": "Scale",
         "Inputs": [_t("x", [8, 3, 8, 8], "Row major linear FP32")],
         "Outputs": [_t("x_q_out", [8, 3, 8, 8],
                        "Thirty-two wide channel vectorized row major Int8 format")],
         "ParameterType": "Scale", "Mode": "UNIFORM", "TacticName": "", "StreamId": 0,
         "Metadata": "[ONNX Layer: x_q]"},
        {"Name": "w_q + w_dq + x_dq + conv_int8 + relu", "LayerType": "CaskConvolution",
         "Inputs": [_t("x_q_out", [8, 3, 8, 8],
                       "Thirty-two wide channel vectorized row major Int8 format")],
         "Outputs": [_t("relu_out", [8, 4, 8, 8], "Row major linear FP32")],
         "ParameterType": "Convolution", "Kernel": [3, 3], "PaddingMode": "kEXPLICIT_ROUND_DOWN",
         "PrePadding": [1, 1], "PostPadding": [1, 1], "Stride": [1, 1], "Dilation": [1, 1],
         "OutMaps": 4, "Groups": 1, "Weights": {"Type": "Int8", "Count": 108},
         "Bias": {"Type": "Float", "Count": 4}, "Activation": "RELU",
         "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32",
         "StreamId": 0,
         "Metadata": US.join(f"[ONNX Layer: {n}]"
                             for n in ("w_q", "w_dq", "x_dq", "conv_int8", "relu"))},
        {"Name": "to_fp16", "LayerType": "Cast",
         "Inputs": [_t("relu_out", [8, 4, 8, 8], "Row major linear FP32")],
         "Outputs": [_t("to_fp16_out", [8, 4, 8, 8], "Row major linear FP16 format")],
         "ParameterType": "Cast", "ToType": "Half", "TacticName": "", "StreamId": 0,
         "Metadata": "[ONNX Layer: to_fp16]"},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to conv_fp16", "LayerType": "Reformat",
         "Inputs": [_t("to_fp16_out", [8, 4, 8, 8], "Row major linear FP16 format")],
         "Outputs": [_t("reformatted", [8, 4, 8, 8],
                        "Channel major FP16 format where channel % 8 == 0")],
         "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticName": "", "StreamId": 0,
         "Metadata": "[ONNX Layer: conv_fp16]"},
        {"Name": "conv_fp16", "LayerType": "CaskConvolution",
         "Inputs": [_t("reformatted", [8, 4, 8, 8],
                       "Channel major FP16 format where channel % 8 == 0")],
         "Outputs": [_t("conv_fp16_out", [8, 4, 8, 8],
                        "Channel major FP16 format where channel % 8 == 0")],
         "ParameterType": "Convolution", "Kernel": [3, 3], "OutMaps": 4, "Groups": 1,
         "Weights": {"Type": "Half", "Count": 144}, "Bias": {"Type": "Half", "Count": 4},
         "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc",
         "StreamId": 0, "Metadata": "[ONNX Layer: conv_fp16]"},
        {"Name": "to_fp32", "LayerType": "Cast",
         "Inputs": [_t("conv_fp16_out", [8, 4, 8, 8],
                       "Channel major FP16 format where channel % 8 == 0")],
         "Outputs": [_t("to_fp32_out", [8, 4, 8, 8], "Row major linear FP32")],
         "ParameterType": "Cast", "ToType": "Float", "TacticName": "", "StreamId": 0,
         "Metadata": "[ONNX Layer: to_fp32]"},
        {"Name": "conv_fp32", "LayerType": "CaskConvolution",
         "Inputs": [_t("to_fp32_out", [8, 4, 8, 8], "Row major linear FP32")],
         "Outputs": [_t("y", [8, 2, 8, 8], "Row major linear FP32")],
         "ParameterType": "Convolution", "Kernel": [3, 3], "OutMaps": 2, "Groups": 1,
         "Weights": {"Type": "Float", "Count": 72}, "Bias": {"Type": "Float", "Count": 2},
         "TacticName": "sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw",
         "StreamId": 0, "Metadata": "[ONNX Layer: conv_fp32]"},
        {"Name": "shape_of_x", "LayerType": "Shape",
         "Inputs": [_t("x_shape", [4], "Row major linear Int32")],
         "Outputs": [_t("x_shape_out", [4], "Row major linear Int32")],
         "ParameterType": "Shape", "TacticName": "", "StreamId": 0,
         "Metadata": "[ONNX Layer: shape_of_x]"},
    ],
    "Bindings": ["x", "y"],
}

TRT11_DETAILED = {
    "Layers": [
        {"Name": "__myl_QuanDequConvRelu_myl0_0", "LayerType": "kgen",
         "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [8, 3, 8, 8],
                     "DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}],
         "Outputs": [{"Name": "x_q_out", "Location": "Device", "Dimensions": [8, 3, 8, 8],
                      "DataType": "Int8", "Format": "Row major linear Int8 format (kLINEAR)"}],
         "TacticName": "__myl_QuanDequConvRelu_0x9a1b", "StreamId": 0,
         "Metadata": "[ONNX Layer: x_q]"},
        {"Name": "__myl_Conv_myl0_1", "LayerType": "gemm",
         "Inputs": [{"Name": "x_q_out", "Location": "Device", "Dimensions": [8, 3, 8, 8],
                     "DataType": "Int8",
                     "Format": "Thirty-two wide channel vectorized row major Int8 format (kCHW32)"},
                    {"Name": "w_int8", "Location": "Device", "Dimensions": [4, 3, 3, 3],
                     "DataType": "Int8", "Format": "Row major linear Int8 format (kLINEAR)"}],
         "Outputs": [{"Name": "relu_out", "Location": "Device", "Dimensions": [8, 4, 8, 8],
                      "DataType": "Half",
                      "Format": "Channel major FP16 format where channel % 8 == 0 (kHWC8)"}],
         "TacticName": "sm90_xmma_fprop_i8i8_i8i32_f32", "StreamId": 0,
         "Metadata": US.join(f"[ONNX Layer: {n}]"
                             for n in ("x_dq", "w_dq", "conv_int8", "relu", "to_fp16"))},
        {"Name": "__myl_Conv_myl0_2", "LayerType": "gemm",
         "Inputs": [{"Name": "relu_out", "Location": "Device", "Dimensions": [8, 4, 8, 8],
                     "DataType": "Half",
                     "Format": "Channel major FP16 format where channel % 8 == 0 (kHWC8)"}],
         "Outputs": [{"Name": "y", "Location": "Device", "Dimensions": [8, 2, 8, 8],
                      "DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}],
         "TacticName": "sm90_xmma_fprop_f16f16_f16f32_f32", "StreamId": 0,
         "Metadata": US.join(f"[ONNX Layer: {n}]" for n in ("conv_fp16", "to_fp32"))},
    ],
    "I/O Tensors": [
        {"Name": "x", "IOMode": "Input", "DataType": "Float", "Dimensions": [-1, 3, 8, 8],
         "Location": "Device", "IsShapeInferenceIO": False,
         "ProfileInfo": [{"MinShape": [1, 3, 8, 8], "OptShape": [8, 3, 8, 8],
                          "MaxShape": [32, 3, 8, 8],
                          "Format": "Row major linear FP32 format (kLINEAR)"}]},
        {"Name": "y", "IOMode": "Output", "DataType": "Float", "Dimensions": [-1, 2, 8, 8],
         "Location": "Device", "IsShapeInferenceIO": False},
    ],
}


def test_trt10_inspector_json_gives_per_node_precision():
    got = precisions_from_inspector_json(json.dumps(TRT10_DETAILED))
    assert got["conv_int8"] == "int8"
    assert got["relu"] == "int8"            # fused into the int8 conv
    assert got["conv_fp16"] == "fp16"       # the fp32 -> fp16 reformat layer is ignored
    assert got["conv_fp32"] == "fp32"
    assert got["x_q"] == "fp32"             # a quantize layer reads fp32
    assert got["to_fp32"] == "fp16"
    assert "shape_of_x" not in got          # only integer index tensors: no precision


def test_trt11_split_datatype_and_kgen_layers():
    got = precisions_from_inspector_json(json.dumps(TRT11_DETAILED))
    assert got == {"x_q": "fp32", "x_dq": "int8", "w_dq": "int8", "conv_int8": "int8",
                   "relu": "int8", "to_fp16": "int8", "conv_fp16": "fp16", "to_fp32": "fp16"}


def test_raw_control_characters_in_metadata_are_accepted():
    text = ('{"Layers": [{"Name": "a + b", "LayerType": "CaskConvolution", '
            '"Inputs": [{"Format/Datatype": "Int8"}], '
            '"Metadata": "[ONNX Layer: /m/conv/Conv]\x1e[ONNX Layer: /m/act/Relu]"}]}')
    assert precisions_from_inspector_json(text) == {"/m/conv/Conv": "int8",
                                                    "/m/act/Relu": "int8"}


def test_layer_name_is_used_when_metadata_is_missing():
    text = json.dumps({"Layers": [{"Name": "conv1 + relu1", "LayerType": "CaskConvolution",
                                   "Inputs": [{"Format/Datatype": "Row major linear FP32"}]}]})
    assert precisions_from_inspector_json(text) == {"conv1": "fp32", "relu1": "fp32"}


def test_node_in_several_layers_reports_widest_precision():
    layers = [{"Name": f"part{i}", "LayerType": "kgen", "Inputs": [{"Format/Datatype": fmt}],
               "Metadata": "[ONNX Layer: mm]"} for i, fmt in enumerate(("Int8", "Float"))]
    assert precisions_from_inspector_json(json.dumps({"Layers": layers})) == {"mm": "fp32"}


def test_embedded_weights_narrow_a_fused_cast_layer():
    layer = {"Name": "to_fp16 + conv_fp16", "LayerType": "CaskConvolution",
             "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
             "Weights": {"Type": "Half", "Count": 144},
             "Metadata": f"[ONNX Layer: to_fp16]{US}[ONNX Layer: conv_fp16]"}
    assert precisions_from_inspector_json(json.dumps({"Layers": [layer]})) == {
        "to_fp16": "fp16", "conv_fp16": "fp16"}


def test_bfloat16_and_uint8_types():
    layers = [{"Name": "a", "LayerType": "kgen", "Inputs": [{"DataType": "BFloat16"}]},
              {"Name": "b", "LayerType": "kgen", "Inputs": [{"DataType": "UInt8"}]},
              {"Name": "c", "LayerType": "kgen", "Inputs": [{"DataType": "FP8"}]}]
    assert precisions_from_inspector_json(json.dumps({"Layers": layers})) == {
        "a": "fp16", "b": "int8"}


def test_layer_names_only_output_is_a_clear_error():
    text = json.dumps({"Layers": ["x_q", "conv_int8 + relu"], "Bindings": ["x", "y"]})
    with pytest.raises(ValueError, match="ProfilingVerbosity.DETAILED"):
        precisions_from_inspector_json(text)


@pytest.mark.parametrize("text", ["not json", "[]", '{"Bindings": []}'])
def test_malformed_inspector_output_is_a_clear_error(text):
    with pytest.raises(ValueError, match="engine inspector"):
        precisions_from_inspector_json(text)


# ---------------------------------------------------------------------------------------------
# Availability errors, flags, profiles, module hygiene (CPU)
# ---------------------------------------------------------------------------------------------

def _fake_tensorrt(version):
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    return module


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    backend = TensorRTBackend()
    calls = [backend.check_available, backend.version,
             lambda: backend.build(onnx.ModelProto(), BuildOptions()),
             lambda: backend.deserialize(b"x", BuildOptions())]
    for call in calls:
        with pytest.raises(BackendUnavailable, match=r"pip install mixq\[tensorrt\]"):
            call()


def test_missing_gpu_points_to_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.9.0.34"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable) as err:
        TensorRTBackend().check_available()
    assert "TensorRT needs an NVIDIA GPU" in str(err.value)
    assert "backend='onnxruntime' runs on CPU" in str(err.value)


def test_old_tensorrt_is_rejected(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1"))
    with pytest.raises(BackendUnavailable, match="too old"):
        TensorRTBackend().check_available()


def test_module_imports_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None; "
            "from mixq.speedup.backends.tensorrt import TensorRTBackend; "
            "print(TensorRTBackend.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "tensorrt"


def test_no_removed_tensorrt_api_in_module():
    import pathlib
    root = pathlib.Path(trt_backend.__file__).parent
    paths = sorted(root.glob("tensorrt*.py")) + [root.parents[2] / "benchmarks" / "tensorrt_smoke.py"]
    source = "".join(p.read_text() for p in paths if p.exists())
    # Spelled in pieces so that this test file does not itself contain the names.
    removed = ["max_workspace" + "_size", "execute_async" + "_v2", "STRICT" + "_TYPES",
               "set_dynamic" + "_range", "calib" + "rator", "IInt8" + "Calibrator",
               "build" + "_engine(", "py" + "cuda", "EXPLICIT" + "_BATCH",
               "BuilderFlag." + "INT8", "BuilderFlag." + "FP16", "get_binding" + "_",
               "num_bind" + "ings"]
    assert [name for name in removed if name in source] == []


def test_network_flags_for_tensorrt_10_and_11():
    flags = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt10 = types.SimpleNamespace(__version__="10.13.0", NetworkDefinitionCreationFlag=flags)
    trt11 = types.SimpleNamespace(__version__="11.1.0", NetworkDefinitionCreationFlag=flags)
    assert trt_backend._network_flags(trt10) == 1 << 1
    assert trt_backend._network_flags(trt11) == 0


def test_batch_profile_shapes():
    opts = BuildOptions(max_batch=64, opt_batch=16)
    assert trt_backend._batch_profile((-1, 3, 8, 8), "x", opts) == (
        (1, 3, 8, 8), (16, 3, 8, 8), (64, 3, 8, 8))
    assert trt_backend._batch_profile((-1, 10), "x", BuildOptions(max_batch=4, opt_batch=32)) \
        == ((1, 10), (4, 10), (4, 10))
    assert trt_backend._batch_profile((2, 10), "x", opts) is None
    with pytest.raises(TensorRTBuildError, match="only the batch axis"):
        trt_backend._batch_profile((-1, 3, -1, -1), "x", opts)


# ---------------------------------------------------------------------------------------------
# ONNX fixtures: Q/DQ on input and weight around a Conv (+ fp16 and fp32 convs)
# ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
X_SCALE = np.float32(0.03)
W1 = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
W1_SCALE = (np.abs(W1).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
B1 = RNG.normal(size=4).astype(np.float32)
W2 = (0.3 * RNG.normal(size=(4, 4, 3, 3))).astype(np.float16)
B2 = RNG.normal(size=4).astype(np.float16)
W3 = (0.3 * RNG.normal(size=(2, 4, 3, 3))).astype(np.float32)
B3 = RNG.normal(size=2).astype(np.float32)


def _model(mixed: bool) -> onnx.ModelProto:
    init = [numpy_helper.from_array(X_SCALE.reshape(()), "x_scale"),
            numpy_helper.from_array(np.zeros((), np.int8), "x_zp"),
            numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W1_SCALE, "w1_scale"),
            numpy_helper.from_array(np.zeros(4, np.int8), "w1_zp"),
            numpy_helper.from_array(B1, "b1")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"],
                              name="x_dq"),
             helper.make_node("QuantizeLinear", ["w1", "w1_scale", "w1_zp"], ["w1q"], axis=0,
                              name="w_q"),
             helper.make_node("DequantizeLinear", ["w1q", "w1_scale", "w1_zp"], ["w1dq"],
                              axis=0, name="w_dq"),
             helper.make_node("Conv", ["xdq", "w1dq", "b1"], ["c1"], pads=[1, 1, 1, 1],
                              name="conv_int8"),
             helper.make_node("Relu", ["c1"], ["r1" if mixed else "y"], name="relu")]
    out_channels = 4
    if mixed:
        init += [numpy_helper.from_array(W2, "w2"), numpy_helper.from_array(B2, "b2"),
                 numpy_helper.from_array(W3, "w3"), numpy_helper.from_array(B3, "b3")]
        nodes += [helper.make_node("Cast", ["r1"], ["h1"], to=TensorProto.FLOAT16,
                                   name="to_fp16"),
                  helper.make_node("Conv", ["h1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1],
                                   name="conv_fp16"),
                  helper.make_node("Cast", ["h2"], ["f2"], to=TensorProto.FLOAT, name="to_fp32"),
                  helper.make_node("Conv", ["f2", "w3", "b3"], ["y"], pads=[1, 1, 1, 1],
                                   name="conv_fp32")]
        out_channels = 2
    graph = helper.make_graph(
        nodes, "mixq_trt_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, 8, 8])],
        init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def _onnxruntime(model, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _numpy_qdq_conv_relu(x):
    """Independent reference for the int8 part: ONNX Q/DQ maths + a float64 convolution."""
    xq = np.clip(np.rint(x / X_SCALE), -128, 127) * X_SCALE
    wq = np.clip(np.rint(W1 / W1_SCALE[:, None, None, None]), -128, 127) \
        * W1_SCALE[:, None, None, None]
    y = torch.nn.functional.conv2d(torch.from_numpy(xq.astype(np.float64)),
                                   torch.from_numpy(wq.astype(np.float64)),
                                   torch.from_numpy(B1.astype(np.float64)), padding=1)
    return np.maximum(y.numpy(), 0)


def _input(batch):
    return RNG.uniform(-2, 2, size=(batch, 3, 8, 8)).astype(np.float32)


def test_fixtures_pass_the_conformance_check():
    from mixq.speedup.backends.tensorrt_rules import check_tensorrt_graph
    assert check_tensorrt_graph(_model(False)) == [] and check_tensorrt_graph(_model(True)) == []


def test_qdq_fixture_matches_numpy_reference():
    x = _input(5)
    np.testing.assert_allclose(_onnxruntime(_model(False), x), _numpy_qdq_conv_relu(x),
                               rtol=1e-5, atol=1e-4)
    assert _onnxruntime(_model(True), x).shape == (5, 2, 8, 8)


# ---------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------

def _gpu_skip_reason():
    """Why the GPU tests cannot run here (missing or broken tensorrt, no CUDA device), or None."""
    try:
        TensorRTBackend().check_available()
    except BackendUnavailable as exc:
        return str(exc)
    return None


requires_tensorrt = pytest.mark.skipif(_gpu_skip_reason() is not None,
                                       reason=str(_gpu_skip_reason()))
OPTIONS = BuildOptions(max_batch=16, opt_batch=4, workspace_bytes=1 << 28)


@pytest.fixture(scope="module")
def built():
    backend = TensorRTBackend()
    return backend, backend.build(_model(False), OPTIONS), backend.build(_model(True), OPTIONS)


def _one_step_atol(extra=1e-4):
    """A flipped rounding of one input value moves an output by at most one input step times
    the largest |weight| sum of an output channel."""
    return float(X_SCALE * np.abs(W1).reshape(4, -1).sum(axis=1).max()) + extra


@pytest.mark.tensorrt
@requires_tensorrt
def test_int8_conv_matches_onnxruntime(built):
    _, engine, _ = built
    x = _input(5)
    (y,) = engine.run([x])
    ref = _onnxruntime(_model(False), x)
    assert y.shape == ref.shape and y.dtype == np.float32
    diff = np.abs(y - ref)
    assert diff.max() <= _one_step_atol()
    assert np.mean(diff > 1e-3) < 0.01  # nearly all elements agree to float rounding


@pytest.mark.tensorrt
@requires_tensorrt
def test_dynamic_batch(built):
    _, engine, _ = built
    x = _input(OPTIONS.max_batch)
    (full,) = engine.run([x])
    for batch in (1, OPTIONS.opt_batch, 7):
        (part,) = engine.run([x[:batch]])
        np.testing.assert_allclose(part, full[:batch], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch between 1 and 16"):
        engine.run([_input(OPTIONS.max_batch + 1)])
    with pytest.raises(ValueError, match="input 'x' has shape"):
        engine.run([np.zeros((2, 4, 8, 8), np.float32)])
    with pytest.raises(ValueError, match="takes 1 input"):
        engine.run([x, x])


@pytest.mark.tensorrt
@requires_tensorrt
def test_save_load_round_trip(built):
    backend, engine, _ = built
    payload = engine.serialize()
    assert isinstance(payload, bytes) and payload
    again = backend.deserialize(payload, OPTIONS)
    assert again.input_names == engine.input_names == ["x"]
    assert again.output_names == engine.output_names == ["y"]
    x = _input(3)
    np.testing.assert_allclose(again.run([x])[0], engine.run([x])[0], rtol=1e-6, atol=1e-6)
    assert again.node_precisions() == engine.node_precisions()
    with pytest.raises(EngineFormatError):
        backend.deserialize(b"definitely not a TensorRT engine", OPTIONS)


@pytest.mark.tensorrt
@requires_tensorrt
def test_precision_report_and_mixed_outputs(built):
    _, engine, mixed = built
    assert engine.node_precisions()["conv_int8"] == "int8"
    report = mixed.node_precisions()
    assert (report["conv_int8"], report["conv_fp16"], report["conv_fp32"]) == (
        "int8", "fp16", "fp32")
    x = _input(6)
    (y,) = mixed.run([x])
    mixed.synchronize()
    ref = _onnxruntime(_model(True), x)
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()  # fp16 layer in the middle


@pytest.mark.tensorrt
@requires_tensorrt
def test_parse_error_names_the_node():
    """An operator TensorRT lacks is refused by the conformance check before the parser runs."""
    model = _model(False)
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"], name="bogus",
                                             domain="mixq.test"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("mixq.test", 1))
    with pytest.raises((TensorRTBuildError, TensorRTConformanceError), match="bogus"):
        TensorRTBackend().build(model, OPTIONS)


@pytest.mark.tensorrt
@requires_tensorrt
def test_version_is_tensorrt_10_or_newer():
    import tensorrt
    version = TensorRTBackend().version()
    assert version == tensorrt.__version__ and int(version.split(".")[0]) >= 10
