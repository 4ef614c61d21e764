"""HardSwish / HardSigmoid on ONNX Runtime: the gate quantized on its fixed grid [0, 1] and run as a
saturating QLinearAdd, the product as QLinearMul (MobileNetV3's activations and SE gates)."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from qdq_graphs import op_types, optimized_graph, run

from mixq.compressor.calibration import TENSORS_KEY
from mixq.compressor.wrapper import unwrapped_copy
from mixq.quantizers import ObserverQuantizer, QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.backends.ort_hardsigmoid import hardsigmoid_as_saturating_add
from mixq.speedup.precision_report import layer_rows

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


@pytest.mark.parametrize("alpha,beta", [(1 / 6, 0.5), (0.2, 0.5), (0.25, 0.1)])
@pytest.mark.parametrize("in_scale,in_zp", [(0.05, 128), (0.031, 7), (0.2, 250)])
def test_saturating_add_gives_the_codes_of_quantized_hardsigmoid(alpha, beta, in_scale, in_zp):
    """Every uint8 input code: DQ -> Add -> Q(1/(255 alpha)) equals Q(1/255)(HardSigmoid(DQ(x)))
    computed here in float64 from ONNX's definition, to within one code at exact ties, and the
    rewritten graph runs as one QLinearAdd."""
    init = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
            [("s", in_scale, np.float32), ("z", in_zp, np.uint8), ("so", 1 / 255, np.float32), ("zo", 0, np.uint8)]]
    nodes = [helper.make_node("DequantizeLinear", ["input", "s", "z"], ["f"]),
             helper.make_node("HardSigmoid", ["f"], ["h"], "gate", alpha=alpha, beta=beta),
             helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.UINT8, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [256])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lowered = hardsigmoid_as_saturating_add(copy.deepcopy(model))
    assert [n.op_type for n in lowered.graph.node] == ["DequantizeLinear", "DequantizeLinear", "Add", "QuantizeLinear"]
    codes = np.arange(256, dtype=np.uint8)
    x = in_scale * (codes.astype(np.float64) - in_zp)
    expected = np.clip(np.rint(np.clip(alpha * x + beta, 0, 1) * 255), 0, 255)
    for optimize in (False, True):
        got = run(lowered, codes, optimize).astype(np.float64)
        assert np.abs(got - expected).max() <= 1 and np.mean(got != expected) < 0.02
    assert op_types(optimized_graph(lowered)) == {"QLinearAdd": 1}


def test_other_grids_are_left_alone():
    """A HardSigmoid whose output grid is not [0, 1] keeps its float node."""
    init = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
            [("s", 0.05, np.float32), ("z", 128, np.uint8), ("so", 0.5 / 255, np.float32), ("zo", 0, np.uint8)]]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["f"]),
             helper.make_node("HardSigmoid", ["f"], ["h"], alpha=1 / 6, beta=0.5),
             helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])], init)
    model = hardsigmoid_as_saturating_add(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "HardSigmoid", "QuantizeLinear"]


class MobileBlock(nn.Module):
    """MobileNetV3's inverted residual with HardSwish and a HardSigmoid squeeze-excitation gate
    (torchvision's code: ``nn.Hardswish`` modules, ``F.hardsigmoid``, ``scale * input``)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False),
                                nn.BatchNorm2d(2 * c), nn.Hardswish())
        self.fc1, self.relu, self.fc2 = nn.Conv2d(2 * c, 8, 1), nn.ReLU(), nn.Conv2d(8, 2 * c, 1)
        self.project = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.dw(self.expand(x))
        scale = F.hardsigmoid(self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return x + self.project(scale * y)


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(MobileBlock(), MobileBlock())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def _data(seed, n=32):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = MobileNet().train()
    with torch.no_grad():
        for i in range(4):
            model(_data(10 + i))
    return model.eval()


@pytest.fixture(scope="module")
def calibrated(mobilenet):
    wrapped = copy.deepcopy(mobilenet)
    quantizer = ObserverQuantizer(wrapped, NATURAL)
    with torch.no_grad():
        for i in range(3):
            wrapped(_data(20 + i))
    quantizer.compress()
    config = quantizer.calibration_config()
    engine = ModelSpeedup(mobilenet, (8, 3, 16, 16), config=config, num_threads=1).compress()
    return wrapped, config, engine


def test_hardswish_and_gates_run_as_integer_kernels(calibrated):
    _, config, engine = calibrated
    ops = Counter(n.op_type for n in engine._engine.optimized_model.graph.node)
    # 5 HardSwish gates + 2 SE gates (QLinearAdd) + 2 residual adds; 5 HardSwish products + 2 SE scalings
    assert ops["QLinearAdd"] == 9 and ops["QLinearMul"] == 7, ops
    assert not {"HardSigmoid", "HardSwish", "Mul", "Add"} & set(ops), ops
    assert all(r["actual"] == "int8" for r in engine.precision_report() if r["kind"] in ("layer", "op"))
    gates = {k: v for k, v in config[TENSORS_KEY].items() if k.endswith(".hardsigmoid") or "hardsigmoid#" in k}
    assert len(gates) == 7, sorted(config[TENSORS_KEY])
    assert all((v["tracked_min"], v["tracked_max"]) == (0.0, 1.0) for v in gates.values())


def test_engine_and_lowered_graph_compute_the_simulation(calibrated):
    wrapped, _, engine = calibrated
    x = _data(99, 64)
    with torch.no_grad():
        simulated = wrapped(x).numpy()
    step = (simulated.max() - simulated.min()) / 255
    import onnx
    refined = onnx.load_from_string(engine._engine.serialize())
    reference = run(refined, x.numpy())  # the lowered graph in plain Q/DQ arithmetic
    assert np.abs(reference - simulated).max() < 1.5 * step
    out, _ = engine.inference(x)
    assert np.abs(out.numpy() - simulated).max() < 4 * step
    assert (out.argmax(1) == torch.from_numpy(simulated).argmax(1)).float().mean().item() >= 0.95


def test_qat_keeps_the_gate_grid_fixed(mobilenet):
    """Training updates every observed range but the gates' [0, 1]."""
    wrapped = copy.deepcopy(mobilenet)
    quantizer = QAT_Quantizer(wrapped, NATURAL, dummy_input=_data(1, 4))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    wrapped.train()
    for i in range(3):
        opt.zero_grad()
        wrapped(_data(30 + i, 8)).square().mean().backward()
        opt.step()
    gates = [k for k in quantizer.point_fixed]
    assert len(gates) == 7
    for key in gates:
        lo, hi = quantizer.point_ranges[key]
        assert (float(lo), float(hi)) == (0.0, 1.0)
    assert all(r["actual"] == "int8" for r in layer_rows(
        ModelSpeedup(unwrapped_copy(wrapped).eval(), (8, 3, 16, 16), config=quantizer.calibration_config(),
                     num_threads=1)
        .compress().precision_report()))


def test_only_onnx_runtime_splits_hardswish(mobilenet):
    """OpenVINO fuses HardSwish itself (its int8 MobileNetV3 ran 1.6x slower on the split form) and
    TensorRT has a HardSwish layer: only ONNX Runtime's export writes x * HardSigmoid(x)."""
    from mixq.placement.onnx_export import export_onnx
    from mixq.placement.op_rules import rules_for
    assert [rules_for(b).split_hardswish for b in ("onnxruntime", "openvino", "tensorrt")] == [True, False, False]
    x = _data(3, 2)
    ops = {split: Counter(n.op_type for n in export_onnx(mobilenet, x, {}, split_hardswish=split).model.graph.node)
           for split in (False, True)}
    assert ops[False]["HardSwish"] == 5 and ops[False]["HardSigmoid"] == 2
    assert ops[True]["HardSwish"] == 0 and ops[True]["HardSigmoid"] == 7
