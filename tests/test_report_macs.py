"""The report's multiply-accumulate count and integer share, against counts worked out by hand;
and the automatic dynamic path on a model with a Conv (no calibration data: the Conv stays fp32,
said in its row, and its MACs count as float)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.speedup import ModelSpeedup
from mixq.speedup.precision_report import layer_rows, summary_row


class Attention(nn.Module):
    """Self-attention whose head size is computed from the input's shape (as HF and SDPA code
    do): ONNX shape inference cannot follow it, so the attention products' sizes come from a run."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


def test_attention_products_are_counted_when_their_sizes_depend_on_shapes():
    t, c, h = 10, 16, 2
    engine = ModelSpeedup(Attention(c, h).eval(), dummy_input=torch.randn(2, t, c), extra_layer_bits=8,
                          dynamic=True, num_threads=1).compress()
    linear = t * c * 3 * c + t * c * c              # qkv and out, per sample
    attention = 2 * h * t * t * (c // h)            # Q.K^T and P.V
    summary = summary_row(engine.precision_report())
    assert summary["macs"] == linear + attention
    assert summary["integer_mac_share"] == pytest.approx(linear / (linear + attention))  # the products stay float
    assert summary["weight_mac_share"] == 1.0


def test_automatic_dynamic_path_without_data_keeps_convs_fp32_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    engine = ModelSpeedup(model, dummy_input=x, extra_layer_bits=8, dynamic=True, num_threads=1).compress()
    rows = {r["layer"]: r for r in layer_rows(engine.precision_report())}
    assert (rows["0"]["requested"], rows["0"]["actual"]) == ("int8", "fp32")
    assert "calib_data_loader" in rows["0"]["reason"]
    assert (rows["2"]["requested"], rows["2"]["actual"]) == ("int8", "int8")
    conv, fc = 8 * 4 * 4 * 3 * 4 * 4, 128 * 10
    assert summary_row(engine.precision_report())["integer_mac_share"] == pytest.approx(fc / (conv + fc))
    with torch.no_grad():
        torch.testing.assert_close(engine.inference(x)[0], model(x), atol=0.05, rtol=0.05)
