"""The model's traced view (:mod:`mixq.compressor.module_trace`) and the passes that read it:
execution order with repeated calls, Conv -> BN pairs by tensor identity, per-call layer costs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.compressor.bn_fold import find_conv_bn_pairs
from mixq.compressor.module_trace import trace_modules
from mixq.search import layer_costs


class Shared(nn.Module):
    """BN declared before its conv, a ReLU module used twice, a Linear called twice, a
    functional pool between the conv block and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.other_bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = self.other_bn(y)  # reads the ReLU's output, not the conv's: no pair
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(self.act(self.fc(y)))


def test_calls_in_execution_order_with_repeats_and_mode_restored():
    model = Shared().train()
    calls = trace_modules(model, torch.randn(2, 3, 6, 6), dict(model.named_children()))
    assert [c.name for c in calls] == ["conv", "bn", "act", "other_bn", "fc", "act", "fc"]
    assert calls[1].input_id == calls[0].output_id and calls[2].input_id == calls[1].output_id
    assert calls[3].input_id != calls[0].output_id
    assert model.training and all(m.training for m in model.modules())
    assert len({c.output_id for c in calls}) == len(calls)  # outputs kept alive: ids never reused


def test_conv_bn_pair_found_by_identity_not_declaration_order():
    assert find_conv_bn_pairs(Shared(), torch.randn(2, 3, 6, 6)) == {"conv": "bn"}


def test_layer_costs_count_every_call():
    model = Shared()
    costs = layer_costs(model, ["conv", "fc"], torch.randn(4, 3, 6, 6), "latency", int8_speedup=2.0)
    conv_macs = 8 * 6 * 6 * (3 * 3 * 3)  # output elements x weights per output, one sample
    fc_macs = 2 * 8 * 8                  # called twice
    assert costs["conv"] == (conv_macs / 2.0, float(conv_macs))
    assert costs["fc"] == (fc_macs / 2.0, float(fc_macs))
    size = layer_costs(model, ["fc"], torch.randn(4, 3, 6, 6), "size")
    assert size["fc"] == (64.0, 256.0)  # stored once: 1 byte per int8 weight, 4 per float
