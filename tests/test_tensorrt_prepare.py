"""TensorRT graph preparation: every rewrite is exact (ONNX Runtime gives the same outputs before
and after) and what cannot be rewritten exactly is refused before any build."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixq.speedup.backends.tensorrt_graph import default_opset
from mixq.speedup.backends.tensorrt_prepare import (convert_zero_points, fit_opset, fold_int32_biases,
                                                    prepare_for_tensorrt)
from mixq.speedup.backends.tensorrt_rules import TensorRTConformanceError, check_tensorrt_graph

RNG = np.random.default_rng(1)
W = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
LAYERS = {"conv": ["conv"]}


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inits, opset=17, out_shape=("N", 4, 8, 8)):
    g = helper.make_graph(nodes, "prep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _qdq_conv(x_zp, w_codes, w_zp, bias_int32=True, x_scale=0.02):
    """mixq's int8 conv as onnx_qdq writes it: Q/DQ input, DQ int8 weights, int32 bias DQ."""
    w_scale = (np.abs(W).reshape(4, -1).max(1) / 127).astype(np.float32)
    bias_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
    bias_codes = np.round(np.linspace(-0.5, 0.5, 4) / bias_scale).astype(np.int32)
    inits = [_init("xs", np.float32(x_scale)), _init("xz", x_zp), _init("wq", w_codes), _init("ws", w_scale),
             _init("wz", w_zp), _init("bq", bias_codes), _init("bs", bias_scale), _init("bz", np.zeros(4, np.int32))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x/DequantizeLinear"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0,
                              name="conv.weight/DequantizeLinear"),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0,
                              name="conv.bias/DequantizeLinear"),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    return _model(nodes, inits)


def _codes(zp=0):
    scale = np.abs(W).reshape(4, -1).max(1) / 127
    return np.clip(np.round(W / scale[:, None, None, None]) + zp, -128, 127).astype(np.int8)


def _run(model, x):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


X = RNG.uniform(-2, 2, size=(2, 3, 8, 8)).astype(np.float32)


def _assert_same_outputs(a, b):
    np.testing.assert_allclose(_run(b, X), _run(a, X), rtol=1e-6, atol=1e-6)


def test_int32_bias_is_folded_to_float_exactly():
    model = _qdq_conv(np.int8(0), _codes(), np.zeros(4, np.int8))
    assert {v.rule for v in check_tensorrt_graph(model, LAYERS)} == {"dq-input-type"}
    prepared = prepare_for_tensorrt(model, LAYERS)
    assert [n.op_type for n in prepared.graph.node].count("DequantizeLinear") == 2
    bias = {t.name: t for t in prepared.graph.initializer}[prepared.graph.node[-1].input[2]]
    assert bias.data_type == TensorProto.FLOAT
    _assert_same_outputs(model, prepared)
    assert fold_int32_biases(prepared) is prepared  # nothing left to fold


def test_weight_zero_points_are_folded_into_the_codes_when_exact():
    zp = np.array([0, 3, -2, 0], np.int8)
    codes = np.clip(_codes().astype(np.int16) + zp[:, None, None, None], -128, 127).astype(np.int8)
    model = _qdq_conv(np.int8(0), codes, zp)
    prepared = prepare_for_tensorrt(model, LAYERS)
    dq = next(n for n in prepared.graph.node if n.name == "conv.weight/DequantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    assert not np.any(inits[dq.input[2]]) and inits[dq.input[0]].dtype == np.int8
    _assert_same_outputs(model, prepared)


def test_uint8_weights_with_zero_point_128_become_int8():
    model = _qdq_conv(np.int8(0), (_codes().astype(np.int16) + 128).astype(np.uint8), np.full(4, 128, np.uint8))
    prepared = prepare_for_tensorrt(model, LAYERS)
    _assert_same_outputs(model, prepared)


def test_weight_zero_point_that_overflows_int8_is_refused_naming_the_layer():
    zp = np.array([0, 100, 0, 0], np.int8)
    codes = _codes().astype(np.int16)
    codes[1] = np.clip(codes[1] - 100, -128, 127)  # real codes q - z span more than int8
    model = _qdq_conv(np.int8(0), codes.astype(np.int8), zp)
    with pytest.raises(TensorRTConformanceError) as err:
        prepare_for_tensorrt(model, LAYERS)
    assert "config layer 'conv' (weight)" in str(err.value) and "per_channel_symmetric" in str(err.value)


def test_uint8_activation_grid_with_zero_point_128_is_the_int8_grid():
    model = _qdq_conv(np.uint8(128), _codes(), np.zeros(4, np.int8))
    converted = convert_zero_points(model)
    zps = {n.name: numpy_helper.to_array({t.name: t for t in converted.graph.initializer}[n.input[2]])
           for n in converted.graph.node if n.name.startswith("x/")}
    assert all(z.dtype == np.int8 and z == 0 for z in zps.values())
    _assert_same_outputs(model, converted)
    prepare_for_tensorrt(model, LAYERS)


@pytest.mark.parametrize("zp", [np.uint8(0), np.int8(-128), np.int8(7)])
def test_affine_activation_grids_are_refused(zp):
    with pytest.raises(TensorRTConformanceError) as err:
        prepare_for_tensorrt(_qdq_conv(zp, _codes(), np.zeros(4, np.int8)), LAYERS)
    assert "config layer 'conv' (input)" in str(err.value) and "'quant_dtype': 'int'" in str(err.value)


def test_opset_is_converted_for_real_not_renumbered():
    """Opset 11 Squeeze carries 'axes' as an attribute; opset 13 as an input: a converter job."""
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")
    pool = helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool")
    squeeze = helper.make_node("Squeeze", ["p"], ["y"], axes=[2, 3], name="squeeze")
    model = _model([conv, pool, squeeze], [_init("w", W)], opset=11, out_shape=("N", 4))
    assert "opset" in {v.rule for v in check_tensorrt_graph(model)}
    fitted = fit_opset(model)
    assert default_opset(fitted) == 13
    onnx.checker.check_model(fitted)
    assert len(next(n for n in fitted.graph.node if n.op_type == "Squeeze").input) == 2
    np.testing.assert_allclose(_run(fitted, X), _run(model, X), rtol=1e-6)
    assert check_tensorrt_graph(prepare_for_tensorrt(model)) == []


def test_opset_above_the_parser_maximum_is_converted_down():
    model = _qdq_conv(np.int8(0), _codes(), np.zeros(4, np.int8))
    newer = onnx.version_converter.convert_version(fold_int32_biases(model), 21)
    assert default_opset(prepare_for_tensorrt(newer, LAYERS)) == 20  # TensorRT 10.0's maximum
    assert default_opset(prepare_for_tensorrt(newer, LAYERS, tensorrt_version="11.1.0")) == 21


def test_preparation_is_idempotent_and_leaves_its_input_alone():
    model = _qdq_conv(np.uint8(128), _codes(), np.zeros(4, np.int8))
    before = model.SerializeToString()
    once = prepare_for_tensorrt(model, LAYERS)
    assert model.SerializeToString() == before
    assert prepare_for_tensorrt(once, LAYERS).SerializeToString() == once.SerializeToString()
