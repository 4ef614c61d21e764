"""Each TensorRT conformance rule against a small graph that breaks it (and the graph that keeps it).

The base graph is what mixq writes for one int8 conv layer ``conv`` after TensorRT preparation:
input Q/DQ (int8, zero point 0), int8 per-channel weights read by a DequantizeLinear, a float
bias, a Conv. Every test changes one thing and expects exactly the rule it breaks, naming the
node and the config layer.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixq.speedup.backends.tensorrt_rules import (RULES, TensorRTConformanceError, assert_tensorrt_conforms,
                                                  calibration_violations, check_tensorrt_graph, max_opset,
                                                  supported_ops)

LAYERS = {"conv": ["conv"], "head": ["head"]}
RNG = np.random.default_rng(0)
W_CODES = RNG.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)


def _init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def graph(opset: int = 17, x_zp=np.int8(0), w_zp=None, w_codes=W_CODES, w_scale=None, x_scale=np.float32(0.02),
          bias=None, extra_nodes=(), extra_inits=(), output="y", output_type=TensorProto.FLOAT,
          value_infos=()) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ(int8 weights), float bias) -> y (+ extra nodes)."""
    w_scale = np.full(4, 0.01, np.float32) if w_scale is None else w_scale
    w_zp = np.zeros(4, np.int8) if w_zp is None else w_zp
    bias = np.linspace(-1, 1, 4).astype(np.float32) if bias is None else bias
    inits = [_init("x_scale", x_scale), _init("x_zp", x_zp), _init("w_codes", w_codes), _init("w_scale", w_scale),
             _init("w_zp", w_zp), _init("bias", bias), *extra_inits]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="x/DequantizeLinear"),
             helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zp"], ["w"], axis=0,
                              name="w/DequantizeLinear"),
             helper.make_node("Conv", ["xdq", "w", "bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             *extra_nodes]
    if not extra_nodes:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="head"))
    g = helper.make_graph(nodes, "rules", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info(output, output_type, ["N", "C", "H", "W"])], inits,
                          value_info=list(value_infos))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def rules(model: onnx.ModelProto, version: Optional[str] = None, layers=LAYERS) -> List[str]:
    return sorted({v.rule for v in check_tensorrt_graph(model, layers, version)})


def only(model: onnx.ModelProto, rule: str, node: str, layer: Optional[tuple], version: Optional[str] = None):
    violations = check_tensorrt_graph(model, LAYERS, version)
    assert {v.rule for v in violations} == {rule}, [str(v) for v in violations]
    hit = [v for v in violations if v.node == node]
    assert hit, [str(v) for v in violations]
    if layer is not None:
        assert layer in hit[0].layers, str(hit[0])
        assert f"config layer '{layer[0]}'" in str(hit[0])
    with pytest.raises(TensorRTConformanceError, match=rule):
        assert_tensorrt_conforms(model, LAYERS, version)
    return hit[0]


def test_base_graph_conforms():
    assert check_tensorrt_graph(graph(), LAYERS) == []


def test_every_rule_cites_a_source_and_is_tested():
    for rule in RULES.values():
        assert rule.summary and rule.source
    tested = {"onnx-valid", "opset", "supported-op", "dq-input-type", "q-input-type", "zero-point",
              "zero-point-type", "scale", "scale-type", "per-channel-weights-only", "strong-typing", "io-float32"}
    assert tested == set(RULES)


def test_onnx_valid_catches_a_number_only_opset_bump():
    squeeze = helper.make_node("Squeeze", ["c"], ["y"], axes=[0], name="head")  # 'axes' is an input from 13 on
    model = graph(opset=13, extra_nodes=[squeeze])
    assert "onnx-valid" in rules(model)


def test_opset_range_depends_on_the_tensorrt_release():
    assert max_opset(None) == 20 and max_opset("10.15.1") == 24 and max_opset("11.1.0") == 25
    model = graph(opset=21)
    v = only(model, "opset", "", None)
    assert "21" in v.message and "version_converter" in v.fix
    assert rules(model, "11.1.0") == []
    assert "opset" in rules(graph(opset=12))


def test_unsupported_operator_and_custom_domain():
    unique = helper.make_node("Unique", ["c"], ["y"], name="head")
    only(graph(extra_nodes=[unique]), "supported-op", "head", ("head", "node"))
    custom = helper.make_node("MyOp", ["c"], ["y"], name="head", domain="com.example")
    model = graph(extra_nodes=[custom])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    only(model, "supported-op", "head", ("head", "node"))
    assert "Attention" in supported_ops("10.15.1") and "Attention" not in supported_ops("10.8")


def test_int32_bias_dequantize_is_rejected():
    """What onnx_qdq writes for ONNX Runtime: TensorRT dequantizes only INT8/FP8/INT4/FP4."""
    bias_dq = helper.make_node("DequantizeLinear", ["b_codes", "b_scale", "b_zp"], ["bias_f"], axis=0,
                               name="conv.bias/DequantizeLinear")
    conv = helper.make_node("Conv", ["xdq", "w", "bias_f"], ["c"], pads=[1, 1, 1, 1], name="conv")
    model = graph(extra_nodes=[bias_dq, conv, helper.make_node("Relu", ["c"], ["y"], name="head")],
                  extra_inits=[_init("b_codes", np.arange(4, dtype=np.int32)),
                               _init("b_scale", np.full(4, 2e-4, np.float32)),
                               _init("b_zp", np.zeros(4, np.int32))])
    del model.graph.node[3]  # the base conv, replaced by the one reading the int32 bias
    v = only(model, "dq-input-type", "conv.bias/DequantizeLinear", ("conv", "weight"))
    assert "INT32" in v.message and "prepare_for_tensorrt" in v.fix


def test_uint8_dequantize_input_is_rejected():
    model = graph(w_codes=W_CODES.astype(np.int16).clip(0, 127).astype(np.uint8), w_zp=np.zeros(4, np.uint8))
    assert rules(model) == ["dq-input-type"]
    assert any(v.node == "w/DequantizeLinear" and ("conv", "weight") in v.layers
               for v in check_tensorrt_graph(model, LAYERS))


def test_quantize_of_an_fp16_tensor_below_opset_19():
    cast = helper.make_node("Cast", ["c"], ["h"], to=TensorProto.FLOAT16, name="head/Cast")
    q = helper.make_node("QuantizeLinear", ["h", "x_scale", "x_zp"], ["hq"], name="head/QuantizeLinear")
    dq = helper.make_node("DequantizeLinear", ["hq", "x_scale", "x_zp"], ["y"], name="head/DequantizeLinear")
    only(graph(extra_nodes=[cast, q, dq]), "q-input-type", "head/QuantizeLinear", ("conv", "output"))


def test_non_zero_activation_zero_point_names_layer_and_keys():
    v = only(graph(x_zp=np.int8(-128)), "zero-point", "x/QuantizeLinear", ("conv", "input"))
    assert "[-128]" in v.message
    assert "'quant_scheme': 'per_tensor_symmetric'" in v.fix and "'quant_dtype': 'int'" in v.fix


def test_non_zero_weight_zero_point_names_the_weight():
    v = only(graph(w_zp=np.array([0, 3, 0, 0], np.int8)), "zero-point", "w/DequantizeLinear", ("conv", "weight"))
    assert "per_channel_symmetric" in v.fix


def test_zero_point_must_be_a_build_time_constant():
    model = graph()
    model.graph.input.append(helper.make_tensor_value_info("zp_in", TensorProto.INT8, []))
    model.graph.node[0].input[2] = "zp_in"
    model.graph.node[1].input[2] = "zp_in"
    v = only(model, "zero-point", "x/QuantizeLinear", ("conv", "input"))
    assert "build-time constant" in v.message


def test_uint8_zero_point_type():
    """UINT8 quantization: the parser would import the Q as INT8 (another grid) and rejects the DQ."""
    violations = check_tensorrt_graph(graph(x_zp=np.uint8(0)), LAYERS)
    assert {(v.rule, v.node) for v in violations} == {("zero-point-type", "x/QuantizeLinear"),
                                                      ("dq-input-type", "x/DequantizeLinear")}
    assert all(("conv", "input") in v.layers for v in violations)


@pytest.mark.parametrize("kwargs,text", [
    ({"x_scale": np.float32(-0.02)}, "strictly positive"),
    ({"w_scale": np.full(3, 0.01, np.float32), "w_zp": np.zeros(3, np.int8)}, "3 scales for 4 channels"),
    ({"w_zp": np.zeros(2, np.int8)}, "zero point has 2 values"),
    ({"w_scale": np.full((4, 1), 0.01, np.float32), "w_zp": np.zeros((4, 1), np.int8)}, "rank 2"),
])
def test_scale_rules(kwargs, text):
    violations = check_tensorrt_graph(graph(**kwargs), LAYERS)
    assert any(v.rule == "scale" and text in v.message for v in violations), [str(v) for v in violations]


def test_scale_type_must_match_an_fp16_input_at_opset_19():
    cast = helper.make_node("Cast", ["c"], ["h"], to=TensorProto.FLOAT16, name="head/Cast")
    q = helper.make_node("QuantizeLinear", ["h", "s16", "x_zp"], ["hq"], name="head/QuantizeLinear")
    dq = helper.make_node("DequantizeLinear", ["hq", "s16", "x_zp"], ["hd"], name="head/DequantizeLinear")
    back = helper.make_node("Cast", ["hd"], ["y"], to=TensorProto.FLOAT, name="head/CastBack")
    ok = graph(opset=19, extra_nodes=[cast, q, dq, back], extra_inits=[_init("s16", np.float16(0.02))])
    assert rules(ok) == []
    q32 = helper.make_node("QuantizeLinear", ["c", "s16", "x_zp"], ["hq"], name="head/QuantizeLinear")
    dq32 = helper.make_node("DequantizeLinear", ["hq", "s16", "x_zp"], ["hd"], name="head/DequantizeLinear")
    bad = graph(opset=19, extra_nodes=[q32, dq32, back], extra_inits=[_init("s16", np.float16(0.02))])
    assert "scale-type" in rules(bad)
    assert any(v.rule == "scale-type" and v.node == "head/QuantizeLinear" and ("conv", "output") in v.layers
               for v in check_tensorrt_graph(bad, LAYERS))


def test_per_channel_activation_quantization():
    q = helper.make_node("QuantizeLinear", ["c", "c_scale", "c_zp"], ["cq"], axis=1, name="c/QuantizeLinear")
    dq = helper.make_node("DequantizeLinear", ["cq", "c_scale", "c_zp"], ["cd"], axis=1, name="c/DequantizeLinear")
    relu = helper.make_node("Relu", ["cd"], ["y"], name="head")
    model = graph(extra_nodes=[q, dq, relu], extra_inits=[_init("c_scale", np.full(4, 0.1, np.float32)),
                                                          _init("c_zp", np.zeros(4, np.int8))])
    v = only(model, "per-channel-weights-only", "c/QuantizeLinear", ("conv", "output"))
    assert ("head", "input") in v.layers and "per_tensor" in v.fix


def test_fp16_layer_without_cast_on_its_input():
    """Strongly typed: an fp16 conv reading the float32 tensor directly (the Cast is missing)."""
    conv16 = helper.make_node("Conv", ["c", "w16", "b16"], ["h"], pads=[1, 1, 1, 1], name="head")
    back = helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT, name="head/CastOutputFp32")
    model = graph(extra_nodes=[conv16, back], extra_inits=[
        _init("w16", RNG.normal(size=(2, 4, 3, 3)).astype(np.float16)), _init("b16", np.zeros(2, np.float16))])
    v = only(model, "strong-typing", "head", ("head", "node"))
    assert "FLOAT16" in v.message and "FLOAT" in v.message
    cast = helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16, name="head/CastInputFp16")
    fixed = helper.make_node("Conv", ["c16", "w16", "b16"], ["h"], pads=[1, 1, 1, 1], name="head")
    model = graph(extra_nodes=[cast, fixed, back], extra_inits=[
        _init("w16", RNG.normal(size=(2, 4, 3, 3)).astype(np.float16)), _init("b16", np.zeros(2, np.float16))])
    assert rules(model) == []


def test_integer_bias_read_directly_by_conv():
    model = graph(bias=np.arange(4, dtype=np.int32))
    assert "strong-typing" in rules(model)


def test_fp16_region_must_end_with_a_cast():
    cast = helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT16, name="head")
    only(graph(extra_nodes=[cast], output_type=TensorProto.FLOAT16), "io-float32", "", None)


def test_without_layer_map_the_message_says_how_to_get_it():
    violations = check_tensorrt_graph(graph(x_zp=np.int8(5)))
    assert violations and "pass the plan's layer_nodes" in str(violations[0])


def test_error_lists_every_violation():
    with pytest.raises(TensorRTConformanceError) as err:
        assert_tensorrt_conforms(graph(x_zp=np.int8(5), w_zp=np.ones(4, np.int8)), LAYERS)
    assert len(err.value.violations) == 3  # activation Q and DQ, weight DQ
    assert "nothing was built" in str(err.value)


def test_calibration_violations_name_layer_and_quant_type():
    config = {"conv1": {"input_bits": 8, "tracked_min_input": -1.0, "tracked_max_input": 3.0,
                        "input_scheme": "per_tensor_affine", "input_dtype": "int"},
              "relu1": {"output_bits": 8, "tracked_min_output": 0.0, "tracked_max_output": 6.0,
                        "output_scheme": "per_tensor_symmetric", "output_dtype": "uint"},
              "fc": {"output_bits": 4, "tracked_min_output": 0.0, "tracked_max_output": 6.0,
                     "output_scheme": "per_tensor_affine", "output_dtype": "uint"}}
    found = calibration_violations(config)
    assert [v.layers for v in found] == [[("conv1", "input")]]  # symmetric uint and 4-bit grids fit int8 exactly
    assert "'quant_scheme': 'per_tensor_symmetric'" in found[0].fix
