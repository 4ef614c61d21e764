"""On ONNX Runtime a Concat's inputs that only it reads are quantized on the Concat's own grid, so
QLinearConcat copies them instead of requantizing each (Inception's branches)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from onnx import numpy_helper

from mixq.compressor.calibration import TENSORS_KEY
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.precision_report import layer_rows

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


class BasicConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """GoogLeNet's block: 1x1, 1x1 -> 3x3, 1x1 -> 3x3, max-pool -> 1x1, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicConv(3, 16, 3)
        self.b1 = BasicConv(16, 8, 1)
        self.b2 = nn.Sequential(BasicConv(16, 8, 1), BasicConv(8, 12, 3))
        self.b3 = nn.Sequential(BasicConv(16, 4, 1), BasicConv(4, 6, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv(16, 6, 1))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _data(seed, n=16):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_branch_outputs_take_the_concat_grid():
    torch.manual_seed(0)
    model = Inception().train()
    with torch.no_grad():
        for i in range(3):
            model(_data(10 + i))
    model.eval()
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, NATURAL)
    with torch.no_grad():
        for i in range(3):
            wrapped(_data(20 + i))
    quantizer.compress()
    tensors = quantizer.calibration_config()[TENSORS_KEY]
    plan = quantizer.point_plan
    assert len(plan.shared) == 4 and len(set(plan.shared.values())) == 1
    concat = tensors[next(iter(plan.shared.values()))]
    for key in plan.shared:
        assert {k: tensors[key][k] for k in ("tracked_min", "tracked_max")} == \
               {k: concat[k] for k in ("tracked_min", "tracked_max")}
        assert key not in plan.points  # not simulated separately: one grid commutes with the Concat
    engine = ModelSpeedup(model, (8, 3, 16, 16), config=quantizer.calibration_config(), num_threads=1).compress()
    assert all(r["actual"] == "int8" for r in layer_rows(engine.precision_report()))
    graph = engine._engine.optimized_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "QLinearConcat")
    grids = [(float(inits[node.input[i]]), int(inits[node.input[i + 1]])) for i in range(0, len(node.input), 3)]
    assert len(grids) == 5 and len(set(grids)) == 1, grids  # the output's and every input's
    x = _data(99, 64)
    with torch.no_grad():
        simulated = wrapped(x)
    out, _ = engine.inference(x)
    step = float((simulated.max() - simulated.min()) / 255)
    assert np.abs(out.numpy() - simulated.numpy()).max() < 4 * step
    assert (out.argmax(1) == simulated.argmax(1)).float().mean().item() >= 0.95
