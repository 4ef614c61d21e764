"""Each integer conv runs on whichever of ONNX Runtime's two conv kernels was faster at build time;
the two forms hold the same weights and give bit-identical outputs."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from qdq_graphs import QDQGraph, optimized_graph, random_conv, run

from mixq.speedup import ModelSpeedup
from mixq.speedup.backends.base import BuildOptions
from mixq.speedup.backends.onnxruntime import make_session
from mixq.speedup.backends.ort_conv_kernels import (GEMM_MARGIN, faster_on_gemm, profile_conv_times,
                                                    symmetric_conv_weights, tuning_feeds, with_gemm_weights)
from mixq.speedup.backends.ort_refiner import refine_for_onnxruntime


def _conv_stack(rng, channels=(8, 32, 32), size=16, extreme_code=None):
    """input -> Q/DQ -> [conv 3x3 -> Q/DQ] * 2, refined for ONNX Runtime (uint8 activations)."""
    g = QDQGraph([None, channels[0], size, size])
    x, scale = g.qdq("input", 0.05, 0), 0.05
    for cin, cout in zip(channels, channels[1:]):
        codes, w_scales, bias, b_scales = random_conv(rng, cout, cin, 3, scale)
        if extreme_code is not None:
            codes[0, 0, 0, 0] = extreme_code
        y = g.node("Conv", [x, g.weight(codes, w_scales), g.bias(bias, b_scales)], pads=[1, 1, 1, 1])
        x = g.qdq(y, 0.1, 0)
        scale = 0.1
    return refine_for_onnxruntime(g.build(x))[0]


def _initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _dequantized_weights(model):
    """{weight initializer: (codes - zero point) * scale} of every DequantizeLinear of a constant."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim == 4:
            codes, scale, zp = (inits[n] for n in node.input[:3])
            bcast = (-1, 1, 1, 1)
            out[node.input[0]] = (codes.astype(np.float64) - zp.reshape(bcast)) * scale.reshape(bcast)
    return out


def test_gemm_form_holds_the_same_weights():
    model = _conv_stack(np.random.default_rng(0))
    weights = symmetric_conv_weights(model)
    assert len(weights) == 2
    gemm = with_gemm_weights(model, weights)
    before, after = _dequantized_weights(model), _dequantized_weights(gemm)
    assert before.keys() == after.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(after[name], before[name])
        np.testing.assert_array_equal(_initializer(gemm, name).astype(np.int16),
                                      _initializer(model, name).astype(np.int16) - 1)
    dq_zero_points = [n.input[2] for n in gemm.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert all((_initializer(gemm, z) == -1).all() and _initializer(gemm, z).dtype == np.int8 for z in dq_zero_points)
    assert symmetric_conv_weights(gemm) == {}  # nothing left to move
    onnx.checker.check_model(gemm)


def test_both_kernels_give_bit_identical_outputs_and_run_as_integer_convs():
    """ONNX Runtime runs both forms as QLinearConv (the GEMM form with weight zero point -1) and
    their outputs are identical to the bit, with and without its graph optimizations."""
    rng = np.random.default_rng(1)
    model = _conv_stack(rng)
    gemm = with_gemm_weights(model, symmetric_conv_weights(model))
    x = rng.normal(0, 1, (2, 8, 16, 16)).astype(np.float32)
    for optimize in (False, True):
        np.testing.assert_array_equal(run(gemm, x, optimize), run(model, x, optimize))
    for form, zero_point in ((model, 0), (gemm, -1)):
        optimized = optimized_graph(form)
        convs = [n for n in optimized.graph.node if n.op_type == "QLinearConv"]
        assert len(convs) == 2
        assert all((_initializer(optimized, n.input[5]) == zero_point).all() for n in convs)


def test_only_symmetric_unshared_conv_weights_are_candidates():
    rng = np.random.default_rng(2)
    assert symmetric_conv_weights(_conv_stack(rng, extreme_code=-128)) == {}  # w - 1 would not fit in int8

    model = _conv_stack(rng)
    weight, zp_name = sorted(symmetric_conv_weights(model).items())[0]
    for t in model.graph.initializer:
        if t.name == zp_name:
            t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, 3, np.int8), zp_name))
    assert weight not in symmetric_conv_weights(model)  # an asymmetric weight already runs the GEMM kernel
    assert len(symmetric_conv_weights(model)) == 1

    model = _conv_stack(rng)
    weight = sorted(symmetric_conv_weights(model))[0]
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight)
    model.graph.node.append(helper.make_node("DequantizeLinear", list(dq.input), ["shared_copy"], axis=0))
    assert weight not in symmetric_conv_weights(model)  # read twice: shifting it would change the other reader
    assert len(symmetric_conv_weights(model)) == 1


def test_tuning_feeds_fix_the_batch_and_refuse_other_free_axes():
    def model_with(dims, elem=TensorProto.FLOAT):
        inp = helper.make_tensor_value_info("x", elem, dims)
        out = helper.make_tensor_value_info("y", elem, dims)
        return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [inp], [out]))

    feeds = tuning_feeds(model_with(["batch", 3, 8, 8]), 5)
    assert feeds["x"].shape == (5, 3, 8, 8) and feeds["x"].dtype == np.float32 and np.isfinite(feeds["x"]).all()
    assert tuning_feeds(model_with(["batch", 3, "height", 8]), 5) is None
    ids = tuning_feeds(model_with(["batch", 16], TensorProto.INT64), 2)["x"]
    assert ids.dtype == np.int64 and ids.shape == (2, 16) and not ids.any()  # valid token ids, masks


def test_profile_times_every_integer_conv_of_each_form():
    model = _conv_stack(np.random.default_rng(3), channels=(16, 64, 64), size=32)
    weights = symmetric_conv_weights(model)
    options = BuildOptions(num_threads=2)
    times = profile_conv_times([model, with_gemm_weights(model, weights)],
                               lambda data, tmp: make_session(data, options, tmp, profile=True), tuning_feeds(model, 4))
    assert len(times) == 2
    for per_conv in times:
        assert per_conv.keys() == weights.keys()
        assert all(t > 0 for t in per_conv.values())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 64, 1))

    def forward(self, x):
        return self.body(self.stem(x)).mean((2, 3))


def test_engine_outputs_do_not_depend_on_the_kernels_chosen():
    """Whatever the build chose on this CPU: the engine's graph, with every moved conv put back
    on the symmetric kernel, computes the engine's outputs to the bit; a saved engine loads
    as built (no new timing)."""
    torch.manual_seed(0)
    model = _ConvNet().eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    engine = ModelSpeedup(model, (8, 3, 32, 32), extra_layer_bits=8, calib_data_loader=calib).compress()
    graph = onnx.load_from_string(engine._engine.serialize())
    inits = {t.name: t for t in graph.graph.initializer}
    restored = onnx.ModelProto()
    restored.CopyFrom(graph)
    moved = 0
    for node in restored.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[2].endswith("/gemm_zero_point"):
            moved += 1
            codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.int16) + 1
            name = f"{node.input[0]}/restored"
            restored.graph.initializer.extend([
                numpy_helper.from_array(codes.astype(np.int8), name),
                numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(inits[node.input[2]])), f"{name}_zp")])
            node.input[0], node.input[2] = name, f"{name}_zp"
    assert symmetric_conv_weights(restored).keys() >= symmetric_conv_weights(graph).keys()
    assert len(symmetric_conv_weights(restored)) == 4 and 0 <= moved <= 4
    x = torch.randn(8, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        session = make_session(restored.SerializeToString(), BuildOptions(num_threads=2), tmp)
        expected = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        path = os.path.join(tmp, "engine.mixq")
        engine.export_quantized_model(path)
        loaded = ModelSpeedup.load_quantized_model(path)
    np.testing.assert_array_equal(engine.inference(x)[0].numpy(), expected)
    assert loaded._engine.serialize() == engine._engine.serialize()
    np.testing.assert_array_equal(loaded.inference(x)[0].numpy(), expected)


def test_a_conv_moves_only_when_clearly_faster_on_the_gemm_kernel():
    symmetric = {"a": 100.0, "b": 100.0, "c": 100.0, "d": 50.0}
    gemm = {"a": 60.0, "b": 95.0, "c": 140.0}  # d: not timed in the GEMM form
    assert faster_on_gemm(symmetric, gemm) == ["a"]  # b's 5% is within the margin, c is slower
    assert faster_on_gemm(symmetric, {"a": 100.0 * GEMM_MARGIN}) == []  # at the margin: stays


def test_inputs_that_cannot_be_synthesised_skip_tuning():
    shapeless = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [shapeless], [out]))
    assert tuning_feeds(model, 4) is None
