"""A squeeze-excitation gate's codes are tiled to the feature map before the integer product on
ONNX Runtime: the same values, and a same-shape QLinearMul instead of a broadcast one."""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper, shape_inference

from qdq_graphs import op_types, optimized_graph, run

from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.backends.ort_gate_tile import tile_broadcast_gates


def _gate_product(batch=2, channels=16, size=8, gate_batch=None, q_after=True, shared_gate=False):
    """input [N, C, H, W] and a gate [N, C, 1, 1] (its spatial mean) quantized (uint8), multiplied."""
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
             [("s", 0.05, np.float32), ("z", 128, np.uint8), ("gs", 1 / 255, np.float32), ("gz", 0, np.uint8),
              ("os", 0.04, np.float32), ("oz", 128, np.uint8)]]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Sigmoid", ["pooled"], ["gate"]),
             helper.make_node("QuantizeLinear", ["gate", "gs", "gz"], ["gq"]),
             helper.make_node("DequantizeLinear", ["gq", "gs", "gz"], ["g"], "gate_dq"),
             helper.make_node("Mul", ["x", "g"], ["y"], "se_mul")]
    outputs = ["out"]
    if q_after:
        nodes += [helper.make_node("QuantizeLinear", ["y", "os", "oz"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "os", "oz"], ["out"])]
    else:
        nodes.append(helper.make_node("Identity", ["y"], ["out"]))
    if shared_gate:
        nodes.append(helper.make_node("Identity", ["g"], ["gate_out"]))
        outputs.append("gate_out")
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           [batch, channels, size, size])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return shape_inference.infer_shapes(model)


def test_gate_is_tiled_and_the_product_is_unchanged():
    model = _gate_product()
    tiled = tile_broadcast_gates(_copy(model))
    onnx.checker.check_model(tiled)
    assert op_types(tiled).get("Tile") == 1
    assert "gate_dq" not in {n.name for n in tiled.graph.node}  # the Mul's only gate DQ is replaced, not left dangling
    x = np.random.default_rng(0).normal(0, 2, (2, 16, 8, 8)).astype(np.float32)
    for optimize in (False, True):
        np.testing.assert_array_equal(run(tiled, x, optimize), run(model, x, optimize))
    optimized = optimized_graph(tiled)
    producer = {o: n for n in optimized.graph.node for o in n.output}
    muls = [n for n in optimized.graph.node if n.op_type == "QLinearMul"]
    assert len(muls) == 1 and any(producer.get(i) is not None and producer[i].op_type == "Tile" for i in muls[0].input)


def test_a_gate_read_elsewhere_is_kept_beside_the_tiled_one():
    model = _gate_product(shared_gate=True)
    tiled = tile_broadcast_gates(_copy(model))
    assert op_types(tiled).get("Tile") == 1 and "gate_dq" in {n.name for n in tiled.graph.node}
    x = np.random.default_rng(1).normal(0, 2, (2, 16, 8, 8)).astype(np.float32)
    so_a, so_b = _outputs(model, x), _outputs(tiled, x)
    for a, b in zip(so_a, so_b):
        np.testing.assert_array_equal(a, b)


def test_a_gate_that_is_also_a_graph_output_stays_in_the_graph():
    model = _gate_product()
    model.graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 16, 1, 1]))
    tiled = tile_broadcast_gates(_copy(model))
    onnx.checker.check_model(tiled)
    x = np.random.default_rng(2).normal(0, 2, (2, 16, 8, 8)).astype(np.float32)
    for a, b in zip(_outputs(model, x), _outputs(tiled, x)):
        np.testing.assert_array_equal(a, b)


def test_products_that_are_not_quantized_gates_are_left_alone():
    for model in (_gate_product(q_after=False), _gate_product(size=1)):
        assert "Tile" not in op_types(tile_broadcast_gates(_copy(model)))


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _outputs(model, x):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


class _SqueezeExcitation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.act = nn.SiLU()
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        y = self.act(self.conv(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.project(y * gate)


def test_squeeze_excitation_engine_runs_a_tiled_gate_and_follows_the_simulation():
    torch.manual_seed(0)
    model = _SqueezeExcitation().eval()
    calib = [torch.randn(4, 16, 16, 16) for _ in range(3)]
    wrapped = _quantized(model, calib)
    engine = ModelSpeedup(model, (4, 16, 16, 16), config=wrapped[1].calibration_config()).compress()
    optimized = engine._engine.optimized_model
    producer = {o: n for n in optimized.graph.node for o in n.output}
    gated = [n for n in optimized.graph.node if n.op_type == "QLinearMul"
             and any(producer.get(i) is not None and producer[i].op_type == "Tile" for i in n.input)]
    assert op_types(optimized).get("Tile") == 1 and len(gated) == 1 and "Mul" not in op_types(optimized)
    x = torch.randn(4, 16, 16, 16)
    with torch.no_grad():
        simulated = wrapped[0](x).numpy()
    out = engine.inference(x)[0].numpy()
    scale = np.abs(simulated).max()
    assert np.abs(out - simulated).max() <= 0.05 * scale


def _quantized(model, calib):
    import copy
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, [{"quant_types": ["weight", "input"], "quant_bits": 8,
                                              "op_types": ["Conv2d"]}])
    with torch.no_grad():
        for batch in calib:
            wrapped(batch)
    quantizer.compress()
    return wrapped, quantizer
