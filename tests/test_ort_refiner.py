"""ONNX Runtime backend, unit by unit on hand-built QDQ graphs: the ``_Refiner`` passes and the
precision reader ``node_precisions_from_optimized``.

Every rewrite must compute the same values: the reference is ONNX Runtime running the graph
before the rewrite with its optimizations off. The precision reader is checked against what the
optimized graph ONNX Runtime writes out holds (which kernels read which weights).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from qdq_graphs import QDQGraph, op_types, optimized_graph, random_conv, run

from mixq.speedup.backends.onnxruntime import DISABLED_OPTIMIZERS
from mixq.speedup.backends.ort_precision import INTEGER_KERNELS, node_precisions_from_optimized
from mixq.speedup.backends.ort_refiner import _Refiner, refine_for_onnxruntime

IN_SCALE, ACT_SCALE = 1 / 255, 0.05
U8_ZERO = -128  # an affine uint8 range starting at 0, as the annotation writes it (int8 zero point)


def conv_block(relu_grid_zp: int = U8_ZERO, pool: bool = True, seed: int = 0):
    """x -> Q/DQ -> Conv(int8 weights, int32 bias) -> Q/DQ -> Relu -> Q/DQ [-> MaxPool 2x2 -> Q/DQ]."""
    rng = np.random.default_rng(seed)
    g = QDQGraph([None, 4, 8, 8])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    codes, scales, bias, bias_scales = random_conv(rng, 16, 4, 3, IN_SCALE)
    y = g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], name="conv", pads=[1, 1, 1, 1])
    y = g.qdq(y, ACT_SCALE, relu_grid_zp)
    y = g.qdq(g.node("Relu", [y], name="relu"), ACT_SCALE, relu_grid_zp)
    if pool:
        y = g.qdq(g.node("MaxPool", [y], name="pool", kernel_shape=[2, 2], strides=[2, 2]), ACT_SCALE, relu_grid_zp)
    return g.build(y)


def inputs(seed: int = 1, shape=(3, 4, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=shape).astype(np.float32)


def nodes_by_name(model):
    return {n.name: n for n in model.graph.node}


def test_activations_to_u8_shifts_zero_points_and_keeps_weights_int8():
    model = conv_block()
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    inits = {t.name: t for t in refiner.model.graph.initializer}
    for node in refiner.model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits[node.input[2]]
        if node.input[0] in inits:  # weights and bias keep their signed codes
            assert zp.data_type in (TensorProto.INT8, TensorProto.INT32)
        else:
            assert zp.data_type == TensorProto.UINT8
            original = numpy_helper.to_array(inits[node.input[2].removesuffix(".u8")])
            assert int(numpy_helper.to_array(zp)) == int(original) + 128
    np.testing.assert_array_equal(run(refiner.model, inputs()), run(model, inputs()))


@pytest.mark.parametrize("zp, dropped", [(U8_ZERO, True), (0, False)])
def test_relu_on_a_non_negative_grid_is_dropped(zp, dropped):
    model = conv_block(relu_grid_zp=zp, pool=False)
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    refiner.drop_identity_requantization()
    assert ("relu" not in nodes_by_name(refiner.model)) == dropped
    assert refiner.absorbed == ({"relu"} if dropped else set())
    np.testing.assert_array_equal(run(refiner.model, inputs()), run(model, inputs()))


def conv_relu_q(grid_zp: int):
    """x -> Q/DQ -> Conv -> Relu -> Q/DQ -> MaxPool 2x2 -> Q/DQ: no Q between the conv and its
    ReLU, as the backend's placement writes it (ONNX Runtime fuses the ReLU into the Q)."""
    rng = np.random.default_rng(0)
    g = QDQGraph([None, 2, 8, 8])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    codes, scales, bias, bias_scales = random_conv(rng, 16, 2, 3, IN_SCALE)
    y = g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], name="conv")
    y = g.qdq(g.node("Relu", [y], name="relu"), ACT_SCALE, grid_zp)
    y = g.qdq(g.node("MaxPool", [y], name="pool", kernel_shape=[2, 2], strides=[2, 2]), ACT_SCALE, grid_zp)
    return g.build(y)


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_activation_before_a_symmetric_quantize_moves_after_it_as_a_clip_of_codes(activation):
    """A symmetric grid after a ReLU / ReLU6 (zero point mid-range) cannot absorb it into the
    conv: the Q moves before the activation, which becomes a Clip of the uint8 codes. The codes
    are the same, and ONNX Runtime runs the conv as QLinearConv instead of a float conv (it did
    before: FusedConv, float Relu)."""
    rng = np.random.default_rng(3)
    g = QDQGraph([None, 4, 8, 8])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    codes, scales, bias, bias_scales = random_conv(rng, 16, 4, 3, IN_SCALE)
    y = g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], name="conv", pads=[1, 1, 1, 1])
    bounds = [g.const(np.float32(0.0)), g.const(np.float32(0.3))] if activation == "Clip" else []
    y = g.qdq(g.node(activation, [y] + bounds, name="act"), ACT_SCALE / 20, 0)
    model = g.build(y)
    refined, absorbed = refine_for_onnxruntime(model)
    assert "act" not in absorbed and nodes_by_name(refined)["act"].op_type == "Clip"
    x = np.random.default_rng(4).uniform(0, 1, size=(3, 4, 8, 8)).astype(np.float32)
    expected = run(model, x)
    assert (expected == 0).any() and (expected > 0).any() and expected.max() <= (0.3 if activation == "Clip" else 7)
    np.testing.assert_array_equal(run(refined, x), expected)
    np.testing.assert_array_equal(run(refined, x, optimize=True), expected)
    optimized = optimized_graph(refined, DISABLED_OPTIMIZERS)
    kinds = op_types(optimized)
    assert kinds.get("QLinearConv") == 1 and not {"Conv", "FusedConv", "Relu"} & set(kinds)
    precisions = node_precisions_from_optimized(refined, optimized)
    assert precisions["conv"] == precisions["act"] == "int8"


@pytest.mark.parametrize("zp, absorbed", [(U8_ZERO, True), (0, False)])
def test_relu_before_a_quantize_that_clips_there_is_absorbed(zp, absorbed):
    model = conv_relu_q(zp)
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    refiner.relu_into_quantize()
    assert ("relu" not in nodes_by_name(refiner.model)) == absorbed
    assert refiner.absorbed == ({"relu"} if absorbed else set())
    x = inputs(shape=(3, 2, 8, 8))
    np.testing.assert_array_equal(run(refiner.model, x), run(model, x))
    if absorbed:  # and the few-channel conv + pool then takes the SpaceToDepth path
        refined, _ = refine_for_onnxruntime(model)
        assert "SpaceToDepth" in op_types(refined)
        np.testing.assert_array_equal(run(refined, x), run(model, x))


def test_pool_moves_before_relu():
    model = conv_block(relu_grid_zp=0)  # symmetric grid: the ReLU is not dropped, it swaps with the pool
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    refiner.pool_before_relu()
    order = [n.op_type for n in refiner.model.graph.node if n.op_type in ("Relu", "MaxPool", "Conv")]
    assert order == ["Conv", "MaxPool", "Relu"]
    np.testing.assert_array_equal(run(refiner.model, inputs()), run(model, inputs()))


def test_relu_between_quantized_tensors_becomes_a_lookup():
    model = conv_block(relu_grid_zp=0, pool=False)
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    refiner.relu_to_lookup()
    relu = nodes_by_name(refiner.model)["relu"]
    assert relu.op_type == "LeakyRelu" and [(a.name, a.f) for a in relu.attribute] == [("alpha", 0.0)]
    np.testing.assert_array_equal(run(refiner.model, inputs()), run(model, inputs()))
    assert "QLinearLeakyRelu" in op_types(optimized_graph(refiner.model, DISABLED_OPTIMIZERS))


def clip_graph(lo: float, hi: float, zp: int = U8_ZERO):
    """x -> Q/DQ -> Clip(lo, hi) -> Q/DQ on one grid."""
    g = QDQGraph([None, 8])
    x = g.qdq("input", ACT_SCALE, zp)
    y = g.node("Clip", [x, g.const(np.float32(lo)), g.const(np.float32(hi))], name="clip")
    return g.build(g.qdq(y, ACT_SCALE, zp))


@pytest.mark.parametrize("lo, hi", [(0.5, 3.0), (0.12, 7.77), (-1.0, 2.0)])
def test_clip_runs_on_the_codes(lo, hi):
    model = clip_graph(lo, hi, zp=0 if lo < 0 else U8_ZERO)
    refiner = _Refiner(model)
    refiner.activations_to_u8()
    refiner.clip_codes()
    nodes = nodes_by_name(refiner.model)
    clip = nodes["clip"]
    producer = {o: n for n in refiner.model.graph.node for o in n.output}
    assert producer[clip.input[0]].op_type == "QuantizeLinear"  # reads codes, not floats
    inits = {t.name: numpy_helper.to_array(t) for t in refiner.model.graph.initializer}
    assert inits[clip.input[1]].dtype == inits[clip.input[2]].dtype == np.uint8
    x = np.random.default_rng(0).uniform(-3, 10, size=(64, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(refiner.model, x), run(model, x))


@pytest.mark.parametrize("top, is_relu", [(255 * ACT_SCALE * (1 - 1e-7), True), (200 * ACT_SCALE, False)])
def test_clip_at_the_top_of_the_grid_acts_as_a_relu(top, is_relu):
    """A ReLU6 calibrated to exactly [0, 6] has its upper bound at code 255 up to float rounding."""
    model = clip_graph(0.0, top)
    refined, absorbed = refine_for_onnxruntime(model)
    assert absorbed == (["clip"] if is_relu else [])
    assert ("Clip" not in op_types(refined)) == is_relu
    x = np.random.default_rng(0).uniform(-3, 15, size=(64, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(refined, x), run(model, x))


def test_fp16_layers_run_in_fp32_with_the_same_weights():
    rng = np.random.default_rng(0)
    w16 = rng.standard_normal((6, 4, 3, 3)).astype(np.float16)
    g = QDQGraph([None, 4, 8, 8])
    x16 = g.node("Cast", ["input"], to=TensorProto.FLOAT16)
    y16 = g.node("Conv", [x16, g.const(w16, "w16")], name="conv")
    model = g.build(g.node("Cast", [y16], to=TensorProto.FLOAT))
    refiner = _Refiner(model)
    refiner.fp16_to_fp32()
    casts = [n for n in refiner.model.graph.node if n.op_type == "Cast"]
    assert all(a.i == TensorProto.FLOAT for n in casts for a in n.attribute if a.name == "to")  # none to fp16
    assert all(t.data_type == TensorProto.FLOAT for t in refiner.model.graph.initializer)
    x = inputs()
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w16.astype(np.float32))).numpy()
    np.testing.assert_allclose(run(refiner.model, x), expected, rtol=1e-5, atol=1e-5)


def test_refined_graph_computes_the_annotated_values_with_integer_kernels():
    model = conv_block(relu_grid_zp=U8_ZERO)
    refined, absorbed = refine_for_onnxruntime(model)
    assert absorbed == ["relu"]
    assert not {"Relu", "Cast"} & set(op_types(refined))
    x = inputs(shape=(5, 4, 8, 8))
    np.testing.assert_array_equal(run(refined, x), run(model, x))
    np.testing.assert_array_equal(run(refined, x, optimize=True), run(model, x))
    assert "QLinearConv" in op_types(optimized_graph(refined, DISABLED_OPTIMIZERS))


# ---------------------------------------------------------------------------------------------
# node_precisions_from_optimized
# ---------------------------------------------------------------------------------------------

def weight_readers(optimized, refined, node_name: str):
    """Op types of the optimized nodes reading ``node_name``'s int8 weight initializer."""
    producer = {o: n for n in refined.graph.node for o in n.output}
    weight = producer[nodes_by_name(refined)[node_name].input[1]].input[0]
    return {n.op_type for n in optimized.graph.node if weight in n.input}


def reads_codes(optimized, tensor: str) -> bool:
    """True when ``tensor`` holds integer codes: made by an integer kernel or a QuantizeLinear,
    possibly through layout changes."""
    producer = {o: n for n in optimized.graph.node for o in n.output}
    node = producer.get(tensor)
    while node is not None and node.op_type in ("Transpose", "Reshape"):
        node = producer.get(node.input[0])
    return node is not None and (node.op_type in INTEGER_KERNELS or node.op_type == "QuantizeLinear")


def mixed_graph():
    """An integer conv, a float conv (int8 weights but no Q after it: nothing to fuse into), a
    max-pool and a sigmoid between quantized tensors, and a float Add."""
    rng = np.random.default_rng(3)
    g = QDQGraph([None, 4, 8, 8])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    codes, scales, bias, bias_scales = random_conv(rng, 16, 4, 3, IN_SCALE)
    a = g.qdq(g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], name="int_conv",
                     pads=[1, 1, 1, 1]), ACT_SCALE, 0)
    a = g.qdq(g.node("MaxPool", [a], name="pool", kernel_shape=[2, 2], strides=[2, 2]), ACT_SCALE, 0)
    a = g.qdq(g.node("Sigmoid", [a], name="sigmoid"), 1 / 255, U8_ZERO)
    codes, scales, _, _ = random_conv(rng, 16, 16, 1, ACT_SCALE)
    b = g.node("Conv", [a, g.weight(codes, scales)], name="float_conv")
    return g.build(g.node("Add", [b, b], name="add"))


def test_node_precisions_follow_the_optimized_graph():
    refined, _ = refine_for_onnxruntime(mixed_graph())
    optimized = optimized_graph(refined, DISABLED_OPTIMIZERS)
    precisions = node_precisions_from_optimized(refined, optimized)
    assert set(precisions) == {"int_conv", "pool", "sigmoid", "float_conv", "add"}  # no Q/DQ bookkeeping
    # convs: what reads their int8 weight in the optimized graph
    assert weight_readers(optimized, refined, "int_conv") & INTEGER_KERNELS and precisions["int_conv"] == "int8"
    assert weight_readers(optimized, refined, "float_conv") == {"DequantizeLinear"}
    assert precisions["float_conv"] == "fp32"
    # the max-pool runs on the integer conv's uint8 codes; the sigmoid became a lookup table
    pools = [n for n in optimized.graph.node if "MaxPool" in n.op_type]
    assert pools and all(reads_codes(optimized, p.input[0]) for p in pools) and precisions["pool"] == "int8"
    assert "QLinearSigmoid" in op_types(optimized) and precisions["sigmoid"] == "int8"
    assert precisions["add"] == "fp32"


def test_unfused_quantized_layers_read_as_fp32():
    """With ONNX Runtime's optimizations off nothing fuses: every node reads as fp32."""
    refined, _ = refine_for_onnxruntime(mixed_graph())
    precisions = node_precisions_from_optimized(refined, refined)
    assert precisions["int_conv"] == precisions["float_conv"] == precisions["add"] == "fp32"
    assert precisions["sigmoid"] == precisions["pool"] == "fp32"  # their Qs are still there, float in between


def test_unnamed_activations_keep_their_own_code_bounds():
    """Two unnamed ReLU6-like Clips with different bounds before symmetric grids: each becomes a
    Clip of codes with its own bounds (names come from the unique tensor names, not the nodes')."""
    rng = np.random.default_rng(5)
    g = QDQGraph([None, 4, 8, 8])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    outs = []
    for top in (0.5, 0.1):
        codes, scales, bias, bias_scales = random_conv(rng, 16, 4, 3, IN_SCALE)
        y = g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], pads=[1, 1, 1, 1])
        y = g.node("Clip", [y, g.const(np.float32(0.0)), g.const(np.float32(top))])
        outs.append(g.qdq(y, ACT_SCALE / 20, 0))
    model = g.build(g.node("Concat", outs, axis=1))
    for node in model.graph.node:
        if node.op_type == "Clip":
            node.name = ""
    refined, _ = refine_for_onnxruntime(model)
    onnx.checker.check_model(refined)
    assert op_types(refined).get("Clip") == 2
    xs = np.random.default_rng(6).uniform(0, 1, size=(2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(refined, xs), run(model, xs))
