"""Frontend: fp32 ONNX export with BN folded in torch, and module -> node mapping (both exporters)."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from mixq.models import MnistNet, resnet20_cifar
from mixq.placement.module_map import module_calls
from mixq.placement.onnx_export import EXPORTERS, conv_bn_pairs, export_onnx


class Shared(nn.Module):
    """One ReLU called twice, a nested Sequential with a conv+BN, a functional add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.relu(self.block(x) + x)
        return self.head(x.mean((2, 3)))


def _run(model_proto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)  # some negative gammas
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


@pytest.mark.parametrize("exporter, model_fn, shape", [
    ("torchscript", resnet20_cifar, (3, 32, 32)), ("torchscript", Shared, (3, 8, 8)), ("dynamo", Shared, (3, 8, 8))])
def test_folded_export_matches_torch_and_leaves_model_alone(exporter, model_fn, shape):
    torch.manual_seed(0)
    model = model_fn().eval()
    _randomize_bn(model)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, *shape)
    pairs = conv_bn_pairs(model, (x,))
    assert pairs and all(model.get_submodule(b).__class__ is nn.BatchNorm2d for b in pairs.values())
    exported = export_onnx(model, (x,), pairs, exporter)
    ops = {n.op_type for n in exported.model.graph.node}
    assert "BatchNormalization" not in ops and set(exported.folded) == set(pairs)
    batch = torch.randn(5, *shape)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_allclose(_run(exported.model, batch.numpy()), expected, atol=1e-4, rtol=1e-4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(isinstance(model.get_submodule(b), nn.BatchNorm2d) for b in pairs.values())


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_module_map_mnist(exporter):
    model = MnistNet().eval()
    exported = export_onnx(model, (torch.randn(2, 1, 28, 28),), {}, exporter)
    calls = module_calls(exported.model, [n for n, _ in model.named_modules()])
    nodes = {n.name: n for n in exported.model.graph.node}
    expected_ops = {"conv1": "Conv", "conv2": "Conv", "relu1": "Clip", "pool1": "MaxPool", "fc1": "Gemm",
                    "fc2": "Gemm"}
    for module, op in expected_ops.items():
        assert len(calls[module]) == 1, module
        call = calls[module][0]
        assert [nodes[n].op_type for n in call.nodes] == [op], module
        assert len(call.inputs) == 1 and len(call.outputs) == 1
    # the call boundaries chain: conv1's output is relu1's input, fc2's output is the graph output
    assert calls["conv1"][0].outputs == calls["relu1"][0].inputs
    assert calls["conv1"][0].inputs == ["input"] and calls["fc2"][0].outputs == ["output"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_module_map_repeated_and_nested_modules(exporter):
    model = Shared().eval()
    x = torch.randn(2, 3, 8, 8)
    exported = export_onnx(model, (x,), conv_bn_pairs(model, (x,)), exporter)
    calls = module_calls(exported.model, [n for n, _ in model.named_modules()])
    nodes = {n.name: n for n in exported.model.graph.node}
    assert len(calls["relu"]) == 2  # one module, two calls, told apart
    first, second = calls["relu"]
    assert first.inputs == calls["stem"][0].outputs
    assert nodes[calls["block.0"][0].nodes[0]].op_type == "Conv"
    adds = [n for n in nodes.values() if n.op_type == "Add"]
    assert second.inputs == [adds[0].output[0]]
    assert "block.1" not in calls  # folded into block.0


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_kept_batchnorm_is_not_fused_by_the_exporter(exporter):
    model = Shared().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    exported = export_onnx(model, (x,), {}, exporter, keep=["block.1"])
    calls = module_calls(exported.model, [n for n, _ in model.named_modules()])
    assert calls["block.1"][0].inputs == calls["block.0"][0].outputs  # the conv output stays a tensor
    with torch.no_grad():
        np.testing.assert_allclose(_run(exported.model, x.numpy()), model(x).numpy(), atol=1e-5)
