"""Dynamic quantization of layers that read the same tensor (an attention block's Q/K/V
projections): the tensor is quantized once at run time, as ONNX Runtime's ``quantize_dynamic``
does, and every reader computes on the same codes, which is what the simulation does too."""
from __future__ import annotations

import collections

import onnx
import torch
import torch.nn as nn

from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup

CONFIG = [{"op_types": ["Linear"], "quant_types": ["weight"], "quant_bits": 8, "quant_dynamic": True}]


class Projections(nn.Module):
    """Three Linears on the same hidden state, their sum through a fourth."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.query(x) * self.key(x) + self.value(x)))


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def test_one_run_time_quantization_per_shared_tensor_and_engine_equals_simulation():
    torch.manual_seed(0)
    model = Projections().eval()
    x = torch.randn(4, 6, 32)
    quantizer = ObserverQuantizer(model, CONFIG)  # weights only; activations are quantized at run time
    quantizer.compress()
    engine = ModelSpeedup(model, dummy_input=x, config=quantizer.calibration_config(), num_threads=1).compress()

    annotated = onnx.load_from_string(engine._engine.serialize())
    assert op_counts(annotated)["DynamicQuantizeLinear"] == 2  # the shared hidden state once, the ReLU output once
    optimized = op_counts(engine._engine.optimized_model)
    assert optimized["MatMulIntegerToFloat"] == 3 and optimized["DynamicQuantizeMatMul"] == 1, optimized
    assert {r["actual"] for r in engine.precision_report() if r["kind"] == "layer"} == {"int8"}

    for seed in range(3):
        data = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            simulated = model(data)
        out = engine.inference(data)[0]
        torch.testing.assert_close(out, simulated, rtol=0, atol=1e-5 * simulated.abs().max().item())
