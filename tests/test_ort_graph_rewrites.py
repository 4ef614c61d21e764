"""Graph-level tests of the ONNX Runtime conv rewrites on hand-built QDQ graphs:
``fuse_conv_pool_space_to_depth`` (few-channel conv + 2x2 max-pool through SpaceToDepth) and
``pad_conv_output_channels`` (output channels zero-padded to a multiple of 16) and
``pad_conv_input_channels`` (a few-channel conv's input padded with its zero point).

A rewrite must give bit-identical outputs (ONNX Runtime on the graph before it is the
reference) and must leave every graph it cannot rewrite exactly untouched.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from qdq_graphs import QDQGraph, op_types, optimized_graph, random_conv, run, toposorted

from mixq.speedup.backends.ort_channel_padding import pad_conv_input_channels, pad_conv_output_channels
from mixq.speedup.backends.ort_refiner import refine_for_onnxruntime
from mixq.speedup.backends.ort_space_to_depth import fuse_conv_pool_space_to_depth

IN_SCALE, ACT_SCALE = 1 / 255, 0.04
U8_ZERO = -128


def weight_of(model, node_name: str) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return inits[producer[node.input[1]].input[0]]


def images(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# space-to-depth
# ---------------------------------------------------------------------------------------------

def stem(cin=1, size=28, k=5, conv_attrs=None, pool_kernel=2, pool_scale=ACT_SCALE, weight_zp=0):
    """x -> Q/DQ -> Conv(cin -> 20, k x k) -> Q/DQ -> MaxPool -> Q/DQ -> output."""
    rng = np.random.default_rng(0)
    g = QDQGraph([None, cin, size, size])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    codes, scales, bias, bias_scales = random_conv(rng, 20, cin, k, IN_SCALE)
    w = g.node("DequantizeLinear", [g.const(codes.astype(np.int8), "w"), g.const(scales.astype(np.float32), "w_scale"),
                                    g.const(np.full(20, weight_zp, np.int8), "w_zp")], axis=0)
    y = g.node("Conv", [x, w, g.bias(bias, bias_scales)], name="conv", **(conv_attrs or {}))
    y = g.qdq(y, ACT_SCALE, U8_ZERO)
    y = g.node("MaxPool", [y], name="pool", kernel_shape=[pool_kernel] * 2, strides=[2, 2])
    return g.build(g.qdq(y, pool_scale, U8_ZERO))


@pytest.mark.parametrize("cin, k", [(1, 5), (3, 3)])
def test_conv_pool_becomes_space_to_depth_with_identical_codes(cin, k):
    model = stem(cin=cin, k=k)
    rewritten = toposorted(model)
    assert fuse_conv_pool_space_to_depth(rewritten) == ["conv"]
    rewritten = toposorted(rewritten)
    kinds = op_types(rewritten)
    assert kinds["SpaceToDepth"] == kinds["Split"] == kinds["Max"] == 1 and "MaxPool" not in kinds
    assert next(n for n in rewritten.graph.node if n.op_type == "Max").name == "pool"  # the report follows it
    assert weight_of(rewritten, "conv").shape == (4 * 20, 4 * cin, k // 2 + 1, k // 2 + 1)
    x = images((3, cin, 28, 28))
    np.testing.assert_array_equal(run(rewritten, x), run(model, x))


@pytest.mark.parametrize("case", [
    dict(cin=4),                                              # enough channels for the fast kernels already
    dict(conv_attrs={"strides": [2, 2]}),                     # strided conv
    dict(conv_attrs={"pads": [1, 1, 1, 1]}),                  # padded conv
    dict(size=27),                                            # odd input size
    dict(pool_kernel=3),                                      # not a 2x2 pool
    dict(pool_scale=2 * ACT_SCALE),                           # the pool requantizes onto another grid
    dict(weight_zp=1),                                        # the zero taps would not dequantize to 0
])
def test_space_to_depth_leaves_other_graphs_alone(case):
    model = stem(**case)
    before = model.SerializeToString()
    assert fuse_conv_pool_space_to_depth(model) == []
    assert model.SerializeToString() == before


# ---------------------------------------------------------------------------------------------
# output channel padding
# ---------------------------------------------------------------------------------------------

def padded_pair(cin=4, cout=20, reader="conv", per_channel_q=False, end="output"):
    """x -> Q/DQ -> conv1(cin -> cout) -> Q -> DQ -> Relu -> Q/DQ -> reader, where reader is a
    16-filter conv or Flatten -> Gemm; ``end`` 'add' makes conv1's output also feed an Add,
    'graph' makes it a graph output."""
    rng = np.random.default_rng(1)
    g = QDQGraph([None, cin, 10, 10])
    x = g.qdq("input", IN_SCALE, U8_ZERO)
    codes, scales, bias, bias_scales = random_conv(rng, cout, cin, 3, IN_SCALE)
    y = g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], name="conv1")
    if per_channel_q:
        s, z = g.const(np.full(cout, ACT_SCALE, np.float32)), g.const(np.full(cout, U8_ZERO, np.int8))
        y = g.node("DequantizeLinear", [g.node("QuantizeLinear", [y, s, z], axis=1), s, z], axis=1)
    else:
        y = g.qdq(y, ACT_SCALE, U8_ZERO)
    conv1_out = y
    y = g.qdq(g.node("Relu", [y], name="relu"), ACT_SCALE, U8_ZERO)
    if reader == "conv":
        codes, scales, bias, bias_scales = random_conv(rng, 16, cout, 3, ACT_SCALE)
        y = g.qdq(g.node("Conv", [y, g.weight(codes, scales), g.bias(bias, bias_scales)], name="conv2"),
                  ACT_SCALE, U8_ZERO)
    else:
        flat = g.qdq(g.node("Flatten", [y], axis=1), ACT_SCALE, U8_ZERO)
        codes = rng.integers(-127, 128, size=(10, cout * 8 * 8))
        scales = rng.uniform(0.002, 0.01, size=10)
        y = g.node("Gemm", [flat, g.weight(codes, scales), g.bias(rng.integers(-500, 500, 10), scales * ACT_SCALE)],
                   name="fc", transB=1)
    if end == "add":
        return g.build(y, g.node("Add", [conv1_out, conv1_out]))
    return g.build(y, conv1_out) if end == "graph" else g.build(y)


@pytest.mark.parametrize("reader", ["conv", "fc"])
def test_unaligned_conv_is_padded_and_its_reader_absorbs_the_zeros(reader):
    model = padded_pair(reader=reader)
    padded = toposorted(model)
    assert pad_conv_output_channels(padded) == ["conv1"]
    w1 = weight_of(padded, "conv1")
    assert w1.shape == (32, 4, 3, 3) and not w1[20:].any()
    np.testing.assert_array_equal(w1[:20], weight_of(model, "conv1"))
    if reader == "conv":
        w2 = weight_of(padded, "conv2")
        assert w2.shape == (16, 32, 3, 3) and not w2[:, 20:].any()
    else:
        w2 = weight_of(padded, "fc")
        assert w2.shape == (10, 32 * 8 * 8) and not w2[:, 20 * 64:].any()  # Flatten: channel c at [64c, 64c+64)
    x = images((3, 4, 10, 10))
    np.testing.assert_array_equal(run(padded, x), run(model, x))


@pytest.mark.parametrize("case", [
    dict(cout=32),                # already a multiple of 16
    dict(cout=12),                # fewer than 16 filters
    dict(cin=3),                  # input channels not a multiple of 4: the fast kernels do not apply anyway
    dict(per_channel_q=True),     # a per-channel requantization cannot carry the extra channels
    dict(end="add"),              # the output also meets an Add
    dict(end="graph"),            # the output is a graph output
])
def test_padding_leaves_other_graphs_alone(case):
    model = padded_pair(**case)
    before = model.SerializeToString()
    assert pad_conv_output_channels(model) == []
    assert model.SerializeToString() == before


# ---------------------------------------------------------------------------------------------
# input channel padding
# ---------------------------------------------------------------------------------------------

def rgb_stem(cin=3, in_zero=U8_ZERO + 7, requantized=True):
    """x -> Q/DQ (zero point ``in_zero``) -> Conv(cin -> 16, 3x3, stride 2, pad 1) -> Q/DQ -> output,
    the stem of MobileNetV2/EfficientNet; ``requantized=False`` leaves the conv's output float."""
    rng = np.random.default_rng(2)
    g = QDQGraph([None, cin, 16, 16])
    x = g.qdq("input", IN_SCALE, in_zero)
    codes, scales, bias, bias_scales = random_conv(rng, 16, cin, 3, IN_SCALE)
    y = g.node("Conv", [x, g.weight(codes, scales), g.bias(bias, bias_scales)], name="conv",
               strides=[2, 2], pads=[1, 1, 1, 1])
    return g.build(g.qdq(y, ACT_SCALE, U8_ZERO) if requantized else y)


@pytest.mark.parametrize("cin", [1, 3])
def test_few_channel_conv_reads_zero_point_padded_codes(cin):
    model = rgb_stem(cin=cin)
    padded = toposorted(model)
    assert pad_conv_input_channels(padded) == ["conv"]
    padded = toposorted(padded)
    w = weight_of(padded, "conv")
    assert w.shape == (16, 4, 3, 3) and not w[:, cin:].any()
    np.testing.assert_array_equal(w[:, :cin], weight_of(model, "conv"))
    pad = next(n for n in padded.graph.node if n.op_type == "Pad")
    inits = {t.name: numpy_helper.to_array(t) for t in padded.graph.initializer}
    assert int(inits[pad.input[2]]) == U8_ZERO + 7  # padded codes dequantize to exactly 0
    x = images((3, cin, 16, 16))
    np.testing.assert_array_equal(run(padded, x), run(model, x))
    np.testing.assert_array_equal(run(padded, x, optimize=True), run(model, x, optimize=True))
    refined, _ = refine_for_onnxruntime(model)  # uint8 codes, as the backend builds it
    kinds = op_types(optimized_graph(refined))
    assert kinds["Pad"] == kinds["QLinearConv"] == 1 and "Conv" not in kinds  # still an integer kernel


@pytest.mark.parametrize("case", [dict(cin=4), dict(requantized=False)])
def test_input_padding_leaves_other_graphs_alone(case):
    model = rgb_stem(**case)
    before = model.SerializeToString()
    assert pad_conv_input_channels(model) == []
    assert model.SerializeToString() == before
