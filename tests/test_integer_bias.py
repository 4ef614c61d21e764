"""The engine adds a Conv/Gemm bias as int32 codes on the grid ``input_scale * weight_scale``
(BatchNorm folded in first); the quantizers simulate that rounding, so the annotated graph run as
plain Q/DQ arithmetic by ONNX Runtime equals the simulation at every quantized tensor."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from mixq.quantizers import ObserverQuantizer, QAT_Quantizer
from mixq.speedup import ModelSpeedup

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


class ConvBnNet(nn.Module):
    """Biased convs (one folded with a BatchNorm, one not), a bias-free conv + BN, a biased Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def _data(seed: int, n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = ConvBnNet()
    with torch.no_grad():  # biases and BN shifts far from any grid, so that rounding them shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
            if getattr(m, "bias", None) is not None and not isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-1.0, 1.0)
    net.train()
    with torch.no_grad():
        for i in range(4):
            net(_data(10 + i))
    return net.eval()


def _reference_points(engine: ModelSpeedup, tensors, x: torch.Tensor):
    """The annotated graph's tensors (each quantized point's dequantized value) and output, run by
    ONNX Runtime with every fusion off: Q/DQ arithmetic in float, no integer kernels."""
    import onnxruntime as ort
    annotated = copy.deepcopy(engine.annotated_model)
    present = {o for n in annotated.graph.node for o in n.output}
    names = [t for t in tensors if t in present]
    for t in names:
        annotated.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(annotated.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return dict(zip(names, values[1:])), values[0]


def _simulated_points(quantizer, wrapped: nn.Module, x: torch.Tensor):
    recorded = {}
    original = quantizer.quantize_point

    def record(key, t):
        out = original(key, t)
        recorded[key] = out.detach().numpy().copy()
        return out
    quantizer.quantize_point = record
    try:
        with torch.no_grad():
            out = wrapped(x)
    finally:
        quantizer.quantize_point = original
    return recorded, out.numpy()


def _differing(simulated: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(np.abs(simulated - reference) > 1e-6))


def _assert_points_equal(quantizer, wrapped, engine):
    """Every point's codes equal but for float32 near-ties (measured: under 0.03% of the codes;
    without the bias rounding 0.1-0.3%), and the float output of the last layer equal to 1e-4 on
    over 90% of the samples (measured: 97%; without the bias rounding 44%)."""
    x = _data(99, 128)
    plan = quantizer.point_plan
    assert {"conv1", "conv2", "conv3", "fc"} <= set(plan.bias_inputs), plan.bias_inputs
    simulated, sim_out = _simulated_points(quantizer, wrapped, x)
    reference, ref_out = _reference_points(engine, plan.point_tensors.values(), x)
    compared = 0
    for key, tensor in plan.point_tensors.items():
        if tensor in reference:
            differing = _differing(simulated[key], reference[tensor])
            assert differing <= 5e-4, f"{key}: {differing:.3%} of the codes differ"
            compared += 1
    assert compared >= 3
    assert np.mean((np.abs(sim_out - ref_out) < 1e-4).all(axis=1)) >= 0.9


def test_observer_simulates_the_int32_bias_with_batchnorm_folded(model):
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, NATURAL)
    with torch.no_grad():
        for i in range(4):
            wrapped(_data(20 + i))
    quantizer.compress()
    engine = ModelSpeedup(model, (32, 3, 8, 8), config=quantizer.calibration_config(), num_threads=1).compress()
    _assert_points_equal(quantizer, wrapped, engine)


def test_qat_with_simulated_folding_simulates_the_int32_bias(model):
    wrapped = copy.deepcopy(model)
    quantizer = QAT_Quantizer(wrapped, NATURAL, dummy_input=_data(0, 4))
    assert wrapped.conv1.__dict__["bn"] is not None  # BatchNorm folding simulated in training
    wrapped.train()
    with torch.no_grad():
        for i in range(4):
            wrapped(_data(20 + i))
    wrapped.eval()
    # the engine is built from the float model whose BatchNorm statistics the QAT forwards updated
    engine = ModelSpeedup(_unwrapped(wrapped), (32, 3, 8, 8), config=quantizer.calibration_config(),
                          num_threads=1).compress()
    _assert_points_equal(quantizer, wrapped, engine)


def _unwrapped(wrapped: nn.Module) -> nn.Module:
    from mixq.compressor.wrapper import unwrapped_copy
    return unwrapped_copy(wrapped).eval()


def test_bias_beyond_int32_stays_float_in_both(model):
    """A bias too large for int32 codes on its grid stays float in the engine; the simulation
    leaves it unrounded too (and the engine still matches it)."""
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.conv2.bias[0] = 1e9
    wrapped = copy.deepcopy(big)
    quantizer = ObserverQuantizer(wrapped, NATURAL)
    with torch.no_grad():
        wrapped(_data(20))
    quantizer.compress()
    weight = wrapped.conv2.effective_weight()
    scales = quantizer.bias_scales(wrapped.conv2, weight)
    assert scales is not None and 1e9 / float((scales[0] * scales[1]).min()) > 2 ** 31
    engine = ModelSpeedup(big, (32, 3, 8, 8), config=quantizer.calibration_config(), num_threads=1).compress()
    graph = engine.annotated_model.graph
    assert not any(i.name.startswith("/conv2/Conv.bias_quantized") for i in graph.initializer)
    x = _data(99, 128)
    simulated, _ = _simulated_points(quantizer, wrapped, x)
    reference, _ = _reference_points(engine, quantizer.point_plan.point_tensors.values(), x)
    for key, tensor in quantizer.point_plan.point_tensors.items():
        if tensor in reference:
            assert _differing(simulated[key], reference[tensor]) <= 5e-4, key
