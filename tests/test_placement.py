"""Backend-owned placement: natural configs on real code patterns give integer engines that
compute what the quantizer simulated (issue #10, causes 1-6, each on a model reproducing it)."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.compressor.calibration import TENSORS_KEY, layer_entries
from mixq.quantizers import ObserverQuantizer, QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.precision_report import layer_rows, summary_row

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
INTEGER_MAC_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
                       "ConvInteger", "DynamicQuantizeMatMul"}
FLOAT_MAC_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


class Bottleneck(nn.Module):
    """torchvision's pattern: one ReLU module called three times, ``out += identity``."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv2, self.bn2 = nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv3, self.bn3 = nn.Conv2d(c // 2, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class Head(nn.Linear):
    """An ``nn.Linear`` subclass (like ``NonDynamicallyQuantizableLinear``)."""


class PatternNet(nn.Module):
    """Stem (functional ReLU, weight read through the module), two bottlenecks, a concat of two
    branches, a squeeze-excitation gate with SiLU/Sigmoid, global average pooling, a Linear subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(Bottleneck(), Bottleneck())
        self.left, self.right = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.se_fc1, self.se_fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = Head(16, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x.to(self.stem.weight.dtype))))
        x = self.blocks(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = self.act(x)
        gate = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * gate
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _data(seed: int = 0, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen)


@pytest.fixture(scope="module")
def pattern_net():
    torch.manual_seed(0)
    model = PatternNet()
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(_data(10 + i))  # BatchNorm statistics of the data
    return model.eval()


@pytest.fixture(scope="module")
def natural_engine(pattern_net):
    wrapped = copy.deepcopy(pattern_net)
    quantizer = ObserverQuantizer(wrapped, NATURAL)
    with torch.no_grad():
        for i in range(4):
            wrapped(_data(20 + i))
    quantizer.compress()
    config = quantizer.calibration_config()
    engine = ModelSpeedup(pattern_net, (8, 3, 16, 16), config=config, num_threads=1).compress()
    return wrapped, config, engine


def test_natural_config_runs_every_layer_and_op_in_integer(natural_engine):
    """Cause 1: the engine's placement, not the config's, decides the Q/DQ: every conv, the
    Linear subclass, the residual Adds, the Concat, SiLU (Sigmoid + Mul), the gate and the pools
    run as ONNX Runtime integer kernels."""
    _, _, engine = natural_engine
    report = engine.precision_report()
    assert all(r["actual"] == "int8" for r in layer_rows(report)), layer_rows(report)
    ops = Counter(n.op_type for n in engine._engine.optimized_model.graph.node)
    assert ops["QLinearAdd"] == 2 and ops["QLinearConcat"] == 1 and ops["QLinearSigmoid"] == 2
    assert ops["QLinearMul"] == 2 and ops["QLinearGlobalAveragePool"] == 2 and ops["QGemm"] == 1
    assert not FLOAT_MAC_OPS & set(ops), ops
    assert not {"Relu", "LeakyRelu", "Sigmoid", "Mul", "Add", "Concat"} & set(ops), ops  # none left in float
    assert summary_row(report)["integer_mac_share"] == 1.0


def test_engine_computes_what_the_quantizer_simulated(natural_engine):
    wrapped, _, engine = natural_engine
    x = _data(99, 128)
    with torch.no_grad():
        simulated = wrapped(x)
    out, _ = engine.inference(x)
    step = float((simulated.max() - simulated.min()) / 255)
    assert (out - simulated).abs().max().item() < 4 * step  # a few output codes of rounding in the kernels
    assert (out.argmax(1) == simulated.argmax(1)).float().mean().item() >= 0.99


def test_tensor_with_several_readers_gets_one_shared_range(natural_engine):
    """Cause 2: SiLU's input (read by its Sigmoid and its Mul) and a block's input (read by the
    conv and by the residual Add) are each quantized once, for all readers."""
    _, config, engine = natural_engine
    graph = engine.annotated_model.graph
    producers = {o: n for n in graph.node for o in n.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    sigmoid = next(n for n in graph.node if n.op_type == "Sigmoid" and n.name.startswith("/act/"))
    mul = next(n for n in graph.node if n.op_type == "Mul" and n.name.startswith("/act/"))
    shared = set(sigmoid.input) & set(mul.input)
    assert len(shared) == 1 and producers[shared.pop()].op_type == "DequantizeLinear"
    assert any(key.startswith("act@0") for key in config[TENSORS_KEY])


def test_functional_ops_and_module_internals_are_calibrated(natural_engine):
    """Cause 3: tensors that are not module outputs get ranges: the residual Adds (in place),
    the Concat, SiLU's sigmoid, the gate's Mul, the average pools."""
    _, config, _ = natural_engine
    keys = set(config[TENSORS_KEY])
    assert {"blocks.0@0/add_#0", "blocks.1@0/add_#0"} & keys or {"blocks.0.relu@2", "blocks.1.relu@2"} <= keys
    assert {"@0/cat#0", "act@0.sigmoid", "act@0", "@0/mul#0", "@0/adaptive_avg_pool2d#0"} <= keys
    for entry in config[TENSORS_KEY].values():
        assert entry["tracked_min"] <= entry["tracked_max"]


def test_shared_module_gets_one_range_per_call(natural_engine):
    """Cause 4: the ReLU module called three times has three ranges (one per call)."""
    _, config, _ = natural_engine
    keys = set(config[TENSORS_KEY])
    assert {"blocks.0.relu@0", "blocks.0.relu@1", "blocks.0.relu@2"} <= keys
    ranges = {config[TENSORS_KEY][f"blocks.0.relu@{i}"]["tracked_max"] for i in range(3)}
    assert len(ranges) == 3


def test_code_patterns_select_and_wrap_layers(pattern_net):
    """Cause 4: an nn.Linear subclass matches 'Linear'; forward code reading ``stem.weight``
    through the wrapper works."""
    wrapped = copy.deepcopy(pattern_net)
    quantizer = QAT_Quantizer(wrapped, NATURAL)
    assert "fc" in quantizer.layer_configs and type(wrapped.fc.module) is Head
    assert wrapped.stem.weight is wrapped.stem.module.weight
    wrapped.train()
    wrapped(_data(1, 8)).sum().backward()  # trains through the placed fake quantization
    assert wrapped.stem.module.weight.grad is not None


def test_in_place_and_out_of_place_residual_adds_place_alike():
    """Cause 4: ``out += identity`` and ``out = out + identity`` give the same engine kernels."""
    class OutOfPlace(Bottleneck):
        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out)) + x
            return self.relu(out)

    kernels = []
    for cls in (Bottleneck, OutOfPlace):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 1), cls()).eval()
        engine = ModelSpeedup(model, (4, 3, 8, 8), extra_layer_bits=8, calib_data_loader=[_data(3, 16)[:, :, :8, :8]],
                              num_threads=1).compress()
        kernels.append(Counter(n.op_type for n in engine._engine.optimized_model.graph.node))
        assert all(r["actual"] == "int8" for r in layer_rows(engine.precision_report()))
    assert kernels[0] == kernels[1] and kernels[0]["QLinearAdd"] == 1


class DenseStack(nn.Module):
    """DenseNet's pattern: a pooled transition whose output every layer of the next block
    concatenates, the first layer concatenating a list of that one tensor (``torch.cat([x])``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(2)
        self.layers = nn.ModuleList([nn.Conv2d(8 + 4 * i, 4, 3, padding=1) for i in range(3)])

    def forward(self, x):
        features = [self.pool(self.stem(x))]
        for layer in self.layers:
            features.append(F.relu(layer(torch.cat(features, 1))))
        return torch.cat(features, 1).mean((2, 3))


def test_single_tensor_concat_leaves_its_input_quantized():
    """A ``torch.cat`` of one tensor computes nothing: the pool before it stays the quantized
    tensor every later Concat reads (it once took the pool's range and left the pool, and with
    it every Concat of the block, in float)."""
    torch.manual_seed(0)
    model = DenseStack().eval()
    x = _data(8, 32)
    engine = ModelSpeedup(model, (8, 3, 16, 16), extra_layer_bits=8, calib_data_loader=[x], num_threads=1).compress()
    ops = Counter(n.op_type for n in engine._engine.optimized_model.graph.node)
    assert ops["QLinearAveragePool"] == 1 and ops["QLinearConcat"] == 3, ops
    assert not {"Concat", "AveragePool"} & set(ops), ops
    assert all(r["actual"] == "int8" for r in engine.precision_report() if r["kind"] in ("layer", "op"))


def test_all_zero_weight_channel_builds():
    """Cause 5: a pruned filter (all-zero weights) quantizes with the smallest scale and builds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)).eval()
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[3].weight[1].zero_()
    x = _data(5, 32)
    engine = ModelSpeedup(model, (8, 3, 16, 16), extra_layer_bits=8, calib_data_loader=[x], num_threads=1).compress()
    assert all(r["actual"] == "int8" for r in layer_rows(engine.precision_report()))
    out, _ = engine.inference(x)
    bias = model[3].bias[1].item()
    assert abs(out[:, 1] - bias).max().item() < 0.02 * (abs(bias) + 1)


class ActNet(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 8, 3), act, nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.c2(self.act(self.c1(x))).mean((2, 3)))


def test_report_tells_the_truth_about_float_ops_and_macs():
    """Cause 6: an op the backend runs in float (Tanh on ONNX Runtime) is reported so; the
    summary's integer MAC share agrees with the kernels of ONNX Runtime's optimized graph."""
    torch.manual_seed(0)
    model = ActNet(nn.Tanh()).eval()
    engine = ModelSpeedup(model, (8, 3, 16, 16), extra_layer_bits=8, calib_data_loader=[_data(6, 16)],
                          num_threads=1).compress()
    report = engine.precision_report()
    ops = {r["op"]: r for r in report if r["kind"] == "op"}
    assert ops["Tanh"]["actual"] == "fp32" and "float" in ops["Tanh"]["reason"]
    assert ops["ReduceMean"]["actual"] == "int8"
    optimized = Counter(n.op_type for n in engine._engine.optimized_model.graph.node)
    integer_kernels = sum(optimized[k] for k in INTEGER_MAC_KERNELS)
    float_kernels = sum(optimized[k] for k in FLOAT_MAC_OPS)
    assert (integer_kernels, float_kernels) == (3, 0)
    summary = summary_row(report)
    assert summary["integer_mac_share"] == 1.0 and summary["macs"] == 3 * 8 * 14 * 14 * 9 + 8 * 8 * 14 * 14 + 8 * 3


def test_report_counts_float_layers_in_the_mac_share():
    torch.manual_seed(0)
    model = ActNet(nn.Hardswish()).eval()
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["c1", "fc"]}]
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, config)
    with torch.no_grad():
        wrapped(_data(7, 16))
    quantizer.compress()
    engine = ModelSpeedup(model, (8, 3, 16, 16), config=quantizer.calibration_config(), num_threads=1).compress()
    macs = {"c1": 3 * 8 * 14 * 14 * 9, "c2": 8 * 8 * 14 * 14, "fc": 8 * 3}
    summary = summary_row(engine.precision_report())
    assert summary["integer_mac_share"] == pytest.approx((macs["c1"] + macs["fc"]) / sum(macs.values()))
    assert set(layer_entries(quantizer.calibration_config())) == {"c1", "fc"}


def test_placed_calibration_is_exact_in_onnx_runtime_reference_semantics(natural_engine, pattern_net):
    """The annotated graph, run without fusion (plain Q/DQ arithmetic), equals the simulation."""
    import onnxruntime as ort
    wrapped, _, engine = natural_engine
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(engine.annotated_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = _data(42, 32)
    reference = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        simulated = wrapped(x).numpy()
    step = (simulated.max() - simulated.min()) / 255
    assert np.abs(reference - simulated).max() < 1.5 * step
