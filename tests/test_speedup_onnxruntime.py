"""ONNX Runtime engines against the torch fake-quant model: integer kernels, agreement, fp32 parity."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mixq.datasets import load_cifar10
from mixq.models import resnet18_cifar
from mixq.quantizers import ObserverQuantizer, QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.backends.ort_precision import INTEGER_KERNELS
from mixq.speedup.precision_report import layer_rows

NNI_MNIST_CONFIG = [
    {"quant_types": ["weight", "input"], "quant_bits": {"weight": 8, "input": 8}, "op_names": ["conv1", "conv2"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_names": ["relu1", "relu2"]},
    {"quant_types": ["output", "weight", "input"], "quant_bits": 8, "op_names": ["fc1", "fc2"]},
]


def calibrated(model: nn.Module, config_list, images: torch.Tensor, **kwargs):
    """(wrapped fake-quant model, calibration config) from an ObserverQuantizer run on ``images``."""
    wrapped = copy.deepcopy(model).eval()
    quantizer = ObserverQuantizer(wrapped, config_list, **kwargs)
    with torch.no_grad():
        for i in range(0, len(images), 250):
            wrapped(images[i:i + 250])
    quantizer.compress()
    return wrapped, quantizer.calibration_config(), quantizer


def output_step(config, layer: str) -> float:
    entry = config[layer]
    return max(abs(entry["tracked_min_output"]), abs(entry["tracked_max_output"])) / 127


def assert_weighted_layers_integer(engine: ModelSpeedup, config) -> None:
    report = {r["layer"]: r for r in engine.precision_report()}
    for name, entry in config.items():
        if entry.get("weight_bits", 32) <= 8:
            assert report[name]["actual"] == "int8", report[name]
    ops = set(engine._engine.optimized_op_types)
    assert not ops & {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"}, ops  # no float conv/gemm is left
    assert ops & INTEGER_KERNELS


@pytest.fixture(scope="module")
def mnist_int8(_trained_mnist, mnist):
    model, _ = _trained_mnist
    (xtr, _), (xte, _) = mnist
    wrapped, config, _ = calibrated(model, NNI_MNIST_CONFIG, xtr[:1000])
    engine = ModelSpeedup(wrapped, (64, 1, 28, 28), config=config, num_threads=2)
    engine.compress()
    with torch.no_grad():
        reference = wrapped(xte)
    return engine, config, reference, xte


def test_mnist_int8_runs_integer_kernels(mnist_int8):
    engine, config, _, _ = mnist_int8
    assert_weighted_layers_integer(engine, config)
    assert all(r["actual"] == "int8" and r["reason"] == "" for r in layer_rows(engine.precision_report()))


def test_mnist_int8_agrees_with_torch_fake_quant(mnist_int8):
    engine, config, reference, images = mnist_int8
    out, latency = engine.inference(images)
    agreement = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.99
    steps = (out - reference).abs().max().item() / output_step(config, "fc2")
    assert steps <= 3, f"logits differ by {steps:.1f} quantization steps"
    assert latency > 0


def test_mnist_fp32_engine_matches_torch(_trained_mnist, mnist):
    model, _ = _trained_mnist
    (_, _), (xte, _) = mnist
    engine = ModelSpeedup(model, (500, 1, 28, 28), num_threads=2)
    engine.compress()
    out, _ = engine.inference(xte)
    with torch.no_grad():
        expected = model.eval()(xte)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert {r["actual"] for r in layer_rows(engine.precision_report())} <= {"fp32"}


def test_mixed_precision_is_exactly_the_config(_trained_mnist, mnist):
    model, _ = _trained_mnist
    (xtr, _), (xte, _) = mnist
    config_list = NNI_MNIST_CONFIG + [
        {"quant_types": ["weight", "input"], "quant_bits": {"weight": 16, "input": 16}, "op_names": ["conv1"]},
        {"exclude": True, "op_names": ["fc2"]}]
    wrapped, config, _ = calibrated(model, config_list, xtr[:1000])
    engine = ModelSpeedup(wrapped, (64, 1, 28, 28), config=config, num_threads=2)
    engine.compress()
    report = {r["layer"]: r for r in engine.precision_report()}
    assert "fc2" not in report
    assert report["conv1"]["requested"] == "fp16" and report["conv1"]["actual"] == "fp32"
    assert "fp16" in report["conv1"]["reason"]
    assert report["conv2"]["actual"] == report["fc1"]["actual"] == "int8"
    out, _ = engine.inference(xte[:500])
    with torch.no_grad():
        reference = wrapped(xte[:500])
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    # conv1 runs in fp32 here, the simulation rounds it to fp16: a small, bounded difference
    torch.testing.assert_close(out, reference, atol=0.01 * reference.abs().max().item(), rtol=0)


def test_fp32_layer_between_quantized_tensors_stays_fp32(_trained_mnist, mnist):
    """ONNX Runtime would quantize the float weights of a conv between a DQ and a Q on its own."""
    model, _ = _trained_mnist
    (xtr, _), (xte, _) = mnist
    config_list = NNI_MNIST_CONFIG + [{"quant_types": ["output"], "quant_bits": 8, "op_names": ["conv2"]}]
    wrapped, config, _ = calibrated(model, config_list, xtr[:1000])
    engine = ModelSpeedup(wrapped, (64, 1, 28, 28), config=config, num_threads=2)
    engine.compress()
    report = {r["layer"]: r for r in engine.precision_report()}
    assert report["conv2"]["requested"] == report["conv2"]["actual"] == "fp32"  # float weights, quantized output
    out, _ = engine.inference(xte[:500])
    with torch.no_grad():
        reference = wrapped(xte[:500])
    assert (out - reference).abs().max().item() <= 3 * output_step(config, "fc2")


def test_low_bit_grids_match_the_simulation(_trained_mnist, mnist):
    model, _ = _trained_mnist
    (xtr, _), (xte, _) = mnist
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 6},
                    "op_names": ["conv1", "conv2", "fc1"]},
                   {"quant_types": ["output"], "quant_bits": 5, "op_names": ["relu1", "relu2"]}]
    wrapped, config, _ = calibrated(model, config_list, xtr[:1000])
    engine = ModelSpeedup(wrapped, (64, 1, 28, 28), config=config, num_threads=2)
    engine.compress()
    out, _ = engine.inference(xte[:500])
    with torch.no_grad():
        reference = wrapped(xte[:500])
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    torch.testing.assert_close(out, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


class ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


def test_qat_with_simulated_bn_folding_matches_engine():
    torch.manual_seed(0)
    model = ConvBnNet()
    x, y = torch.randn(256, 3, 8, 8), torch.randint(0, 4, (256,))
    config_list = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                   {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2", "bn2"]}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    quantizer = QAT_Quantizer(model, config_list, optimizer, dummy_input=x[:2])
    for i in range(0, 256, 32):  # a few QAT steps: ranges, BN statistics and weights all move
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        optimizer.step()
    model.eval()
    config = quantizer.calibration_config()
    assert config["conv1"]["folded_bn"] == "bn1"
    engine = ModelSpeedup(model, (64, 3, 8, 8), config=config, num_threads=2)
    engine.compress()
    report = {r["layer"]: r for r in engine.precision_report()}
    assert report["conv1"]["actual"] == report["conv2"]["actual"] == "int8"
    out, _ = engine.inference(x)
    with torch.no_grad():
        reference = model(x)
    torch.testing.assert_close(out, reference, atol=0.02 * reference.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_cifar_resnet18_int8(cifar_root):
    (xtr, _), (xte, _) = load_cifar10(cifar_root)
    torch.manual_seed(0)
    model = resnet18_cifar()
    with torch.no_grad():  # random weights, BN statistics of real images
        model.train()
        model(xtr[:256])
    model.eval()
    residual_bns = [n for n, _ in model.named_modules() if n.endswith(".bn2") or n.endswith("shortcut.1")]
    config_list = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                   {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
                   {"quant_types": ["output"], "quant_bits": 8, "op_names": residual_bns}]
    wrapped, config, _ = calibrated(model, config_list, xtr[:256])
    engine = ModelSpeedup(wrapped, (128, 3, 32, 32), config=config, num_threads=2)
    engine.compress()
    assert_weighted_layers_integer(engine, config)
    out, _ = engine.inference(xte[:128])
    with torch.no_grad():
        reference = wrapped(xte[:128])
    spread = reference.abs().max().item()
    assert (out - reference).abs().max().item() <= 0.05 * spread
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
