"""ONNX Runtime channel alignment: the space-to-depth stem rewrite and conv output-channel padding.

References: torch's float conv for the phase weights, and ONNX Runtime's own integer fusion of
the graph before the rewrite (the codes must be identical)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from mixq.compressor import unwrapped_copy
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.backends.ort_refiner import refine_for_onnxruntime
from mixq.speedup.backends.ort_space_to_depth import phase_weights
from mixq.placement.module_map import module_calls
from mixq.placement.onnx_export import export_onnx
from mixq.speedup.onnx_qdq import annotate
from mixq.speedup.precision_plan import build_plan

AFFINE = {"quant_scheme": "per_tensor_affine", "quant_dtype": "uint"}


def space_to_depth(x: np.ndarray) -> np.ndarray:
    """ONNX SpaceToDepth(blocksize=2), written from the operator's definition."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


@pytest.mark.parametrize("cin, k", [(1, 5), (3, 3), (2, 7)])
def test_phase_weights_compute_the_four_output_phases(cin, k):
    rng = np.random.default_rng(cin)
    w = rng.integers(-127, 128, size=(6, cin, k, k)).astype(np.float64)
    x = rng.integers(0, 256, size=(2, cin, 20, 20)).astype(np.float64)
    full = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    phases = torch.nn.functional.conv2d(torch.from_numpy(space_to_depth(x)), torch.from_numpy(phase_weights(w))).numpy()
    for a in range(2):
        for b in range(2):
            block = phases[:, (a * 2 + b) * 6:(a * 2 + b + 1) * 6]
            np.testing.assert_array_equal(block, full[:, :, a::2, b::2])  # integer-valued: exact


class Stem(nn.Module):
    """RGB stem conv + pool (space-to-depth), then a 20-channel conv feeding a classifier (padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(3, 24, 5), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(24, 20, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.fc = nn.Linear(20 * 5 * 5, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    """A 20-channel conv whose output meets an Add: its channels cannot be padded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(4, 20, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(20, 20, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        y = self.relu1(self.conv1(x))
        y = self.relu2(self.conv2(y) + y)
        return self.fc(y.mean((2, 3)))


CONFIG = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"],
           "quant_scheme": {"input": "per_tensor_affine", "weight": "per_channel_symmetric"},
           "quant_dtype": {"input": "uint", "weight": "int"}},
          {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"], **AFFINE}]


def annotated(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    quantizer = ObserverQuantizer(unwrapped_copy(model), CONFIG)
    with torch.no_grad():
        quantizer.bound_model(x)
    quantizer.compress()
    config = quantizer.calibration_config()
    exported = export_onnx(model, (x[:2],), {})
    calls = module_calls(exported.model, [n for n, _ in model.named_modules()])
    return annotate(exported.model, build_plan(exported.model, calls, {}, model, config)), config


def run(model_proto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def weight_shapes(model_proto):
    inits = {t.name: t for t in model_proto.graph.initializer}
    producer = {o: n for n in model_proto.graph.node for o in n.output}
    return {n.name: tuple(inits[producer[n.input[1]].input[0]].dims)
            for n in model_proto.graph.node if n.op_type in ("Conv", "Gemm")}


def test_stem_and_unaligned_conv_are_rewritten_with_identical_codes():
    torch.manual_seed(0)
    model, x = Stem().eval(), torch.rand(64, 3, 28, 28)
    graph, _ = annotated(model, x)
    refined, _ = refine_for_onnxruntime(graph)
    shapes = weight_shapes(refined)
    assert shapes["/conv1/Conv"] == (96, 12, 3, 3)  # 4 phases x 24 filters on 4 x 3 s2d channels
    assert shapes["/conv2/Conv"] == (32, 24, 3, 3)  # 20 filters padded to 32
    assert shapes["/fc/Gemm"] == (10, 32 * 5 * 5)  # reads the padded channels with zero weights
    ops = [n.op_type for n in refined.graph.node]
    assert "SpaceToDepth" in ops and "Max" in ops and ops.count("MaxPool") == 1
    np.testing.assert_array_equal(run(refined, x.numpy()), run(graph, x.numpy()))


def test_conv_feeding_an_add_keeps_its_channels():
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.rand(32, 4, 8, 8)
    graph, _ = annotated(model, x)
    refined, _ = refine_for_onnxruntime(graph)
    assert weight_shapes(refined) == weight_shapes(graph)
    np.testing.assert_array_equal(run(refined, x.numpy()), run(graph, x.numpy()))


def test_engine_reports_rewritten_layers_as_integer():
    torch.manual_seed(0)
    model, x = Stem().eval(), torch.rand(64, 3, 28, 28)
    _, config = annotated(model, x)
    engine = ModelSpeedup(model, (16, 3, 28, 28), config=config, batchsize=16)
    engine.compress()
    report = {r["layer"]: r["actual"] for r in engine.precision_report()}
    assert report["conv1"] == report["conv2"] == report["fc"] == "int8", report
    out, _ = engine.inference(x[:16])
    graph, _ = annotated(model, x)
    np.testing.assert_array_equal(out.numpy(), run(graph, x[:16].numpy()))
