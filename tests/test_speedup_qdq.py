"""The annotated graph: int8 weights with per-channel scales, int32 bias, Q/DQ pairs, ORT re-encoding."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper

from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer
from mixq.speedup.backends.ort_refiner import refine_for_onnxruntime
from mixq.placement.module_map import module_calls
from mixq.placement.onnx_export import export_onnx
from mixq.speedup.onnx_qdq import annotate, dequantize_bias
from mixq.speedup.precision_plan import build_plan


def _annotated(config_list, output_max=None):
    """The MNIST model's annotated graph from the config's literal module-boundary quantization
    (``backend=None``); ``output_max`` overrides calibrated output ranges' tops."""
    torch.manual_seed(0)
    model = MnistNet().eval()
    x = torch.randn(64, 1, 28, 28)
    quantizer = ObserverQuantizer(model, config_list, backend=None)
    with torch.no_grad():
        model(x)
    quantizer.compress()
    config = quantizer.calibration_config()
    for layer, top in (output_max or {}).items():
        config[layer]["tracked_max_output"] = top
    from mixq.compressor import unwrapped_copy
    float_model = unwrapped_copy(model).eval()
    exported = export_onnx(float_model, (x[:2],), {})
    calls = module_calls(exported.model, [n for n, _ in float_model.named_modules()])
    plan = build_plan(exported.model, calls, {}, float_model, config)
    return annotate(exported.model, plan), model, x, config


def _run(model_proto, x, optimize=False):
    so = ort.SessionOptions()
    if not optimize:  # the reference semantics of the graph, no fusion
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_weights_are_int8_with_per_channel_scales_and_int32_bias():
    annotated, _, _, config = _annotated(
        [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}])
    inits = {t.name: t for t in annotated.graph.initializer}
    float_weights = [t for t in inits.values() if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]
    assert not float_weights  # every weight is stored as int8
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        node = next(n for n in annotated.graph.node if n.name.startswith(f"/{layer}/") and n.op_type in ("Conv", "Gemm"))
        producers = {o: n for n in annotated.graph.node for o in n.output}
        w_dq, b_dq = producers[node.input[1]], producers[node.input[2]]
        assert inits[w_dq.input[0]].data_type == TensorProto.INT8
        scales = numpy_helper.to_array(inits[w_dq.input[1]])
        np.testing.assert_allclose(scales, config[layer]["weight_scale"], rtol=1e-6)
        assert inits[b_dq.input[0]].data_type == TensorProto.INT32
        x_dq = producers[node.input[0]]
        x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]))
        np.testing.assert_allclose(numpy_helper.to_array(inits[b_dq.input[1]]), x_scale * scales, rtol=1e-6)


def test_annotated_graph_computes_the_fake_quant_model():
    annotated, wrapped, x, _ = _annotated(
        [{"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
         {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2", "relu3"]}])
    with torch.no_grad():
        expected = wrapped(x).numpy()
    out = _run(annotated, x.numpy())
    step = np.abs(expected).max() / 127
    assert np.abs(out - expected).max() <= 2 * step


def test_low_bit_activation_grid_is_clipped():
    annotated, wrapped, x, config = _annotated([{"quant_types": ["input"], "quant_bits": 4, "op_names": ["fc1"]}])
    clips = [n for n in annotated.graph.node if n.op_type == "Clip" and "/Flatten_output_0" in n.name]
    assert len(clips) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in annotated.graph.initializer}
    amax = max(abs(config["fc1"]["tracked_min_input"]), config["fc1"]["tracked_max_input"])
    np.testing.assert_allclose([inits[clips[0].input[1]], inits[clips[0].input[2]]], [-8 * amax / 7, amax],
                               rtol=1e-6)  # the 4-bit symmetric grid: [-8, 7] steps of amax / 7
    with torch.no_grad():
        expected = wrapped(x).numpy()
    np.testing.assert_allclose(_run(annotated, x.numpy()), expected, atol=1e-5)


def test_onnxruntime_refinement_keeps_values_and_uses_u8_activations():
    annotated, _, x, _ = _annotated(
        [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
         {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2", "relu3"]}])
    refined, absorbed = refine_for_onnxruntime(annotated)
    inits = {t.name: t for t in refined.graph.initializer}
    for node in refined.graph.node:
        if node.op_type == "QuantizeLinear" or (node.op_type == "DequantizeLinear" and node.input[0] not in inits):
            assert inits[node.input[2]].data_type == TensorProto.UINT8, node.name
        elif node.op_type == "DequantizeLinear" and inits[node.input[0]].data_type != TensorProto.INT32:
            assert inits[node.input[0]].data_type == TensorProto.INT8  # weights stay s8
    assert {n.op_type for n in refined.graph.node} >= {"LeakyRelu"}  # symmetric ReLU outputs: lookup tables
    assert absorbed == []
    order = [n.name for n in refined.graph.node]
    assert order.index("/pool1/MaxPool") < order.index("/relu1/Clip")  # pooled first: they commute
    np.testing.assert_allclose(_run(refined, x.numpy()), _run(annotated, x.numpy()), atol=1e-6)


def test_affine_relu_outputs_are_absorbed():
    affine = {"quant_scheme": "per_tensor_affine", "quant_dtype": "uint"}
    annotated, _, x, _ = _annotated(
        [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"],
          "quant_scheme": {"input": "per_tensor_affine", "weight": "per_channel_symmetric"},
          "quant_dtype": {"input": "uint", "weight": "int"}},
         {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2", "relu3"], **affine}])
    refined, absorbed = refine_for_onnxruntime(annotated)
    assert set(absorbed) == {"/relu1/Clip", "/relu2/Clip", "/relu3/Clip"}
    # compared as ONNX Runtime runs both (integer kernels): the space-to-depth stem sums the same
    # integer products in another order, so the float reference semantics may differ on a tie
    np.testing.assert_array_equal(_run(refined, x.numpy(), optimize=True), _run(annotated, x.numpy(), optimize=True))


def test_relu6_calibrated_to_its_bound_is_absorbed():
    # a trained ReLU6 saturates: its range is exactly [0, 6], so 6.0 is the top of the u8 grid up
    # to float rounding and the Clip changes no code
    affine = {"quant_scheme": "per_tensor_affine", "quant_dtype": "uint"}
    config = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"],
               "quant_scheme": {"input": "per_tensor_affine", "weight": "per_channel_symmetric"},
               "quant_dtype": {"input": "uint", "weight": "int"}},
              {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2", "relu3"], **affine}]
    annotated, _, x, _ = _annotated(config, output_max={"relu1": 6.0, "relu2": 6.0})
    refined, absorbed = refine_for_onnxruntime(annotated)
    assert set(absorbed) == {"/relu1/Clip", "/relu2/Clip", "/relu3/Clip"}
    # (conv layers: ONNX Runtime's integer kernels give the same codes with or without the Clip)
    np.testing.assert_array_equal(_run(refined, x.numpy(), optimize=True), _run(annotated, x.numpy(), optimize=True))
    # a bound inside the grid does change codes: that Clip stays
    annotated, _, _, _ = _annotated(config, output_max={"relu1": 8.0, "relu2": 6.0})
    assert "/relu1/Clip" not in refine_for_onnxruntime(annotated)[1]


def test_int32_bias_folds_back_to_float_for_float_bias_backends():
    annotated, _, x, _ = _annotated(
        [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}])
    folded = dequantize_bias(annotated)
    assert not [t for t in folded.graph.initializer if t.data_type == TensorProto.INT32]
    assert sum(n.op_type == "DequantizeLinear" for n in folded.graph.node) == \
        sum(n.op_type == "DequantizeLinear" for n in annotated.graph.node) - 4  # one bias per layer
    np.testing.assert_allclose(_run(folded, x.numpy()), _run(annotated, x.numpy()), atol=1e-6)


def test_low_bit_clips_run_on_uint8_codes():
    affine = {"quant_scheme": "per_tensor_affine", "quant_dtype": "uint"}
    annotated, _, x, _ = _annotated(
        [{"quant_types": ["input", "weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"],
          "quant_scheme": {"input": "per_tensor_affine", "weight": "per_channel_symmetric"},
          "quant_dtype": {"input": "uint", "weight": "int"}},
         {"quant_types": ["output"], "quant_bits": 4, "op_names": ["relu1", "relu2", "relu3"], **affine}])
    assert any(n.op_type == "Clip" for n in annotated.graph.node)
    refined, _ = refine_for_onnxruntime(annotated)
    inits = {t.name: t for t in refined.graph.initializer}
    clips = [n for n in refined.graph.node if n.op_type == "Clip"]
    assert clips and all(inits[n.input[1]].data_type == TensorProto.UINT8 for n in clips)
    producers = {o: n for n in refined.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type != "DequantizeLinear" for n in clips)  # reads codes, not floats
    np.testing.assert_array_equal(_run(refined, x.numpy(), optimize=True), _run(annotated, x.numpy(), optimize=True))
