"""Quantizers end to end on real MNIST images, and their exact integer simulation."""
import copy
import filecmp

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.compressor import NonFiniteTensorError, load_calibration_config, unwrapped_copy
from mixq.compressor.calibration import layer_entries
from mixq.models import MnistNet, accuracy, train_epochs
from mixq.quantizers import NaiveQuantizer, ObserverQuantizer, QAT_Quantizer

CONFIG_8BIT = [
    {"quant_types": ["weight", "input"], "quant_bits": {"weight": 8, "input": 8}, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU6"]},
]


def np_fake_quant(x, lo, hi, bits, scheme, dtype, axis=None):
    """numpy dequantize(quantize(x)) from the DESIGN.md formulas (per-tensor or per-channel)."""
    if axis is not None:
        return np.stack([np_fake_quant(np.take(x, c, axis), lo[c], hi[c], bits, scheme, dtype)
                         for c in range(x.shape[axis])], axis)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = (0, 2 ** bits - 1) if dtype == "uint" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if scheme.endswith("symmetric"):
        scale = np.float32(max(-lo, hi) / (2 ** (bits - 1) - 1))
        zp = 0 if dtype == "int" else 2 ** (bits - 1)
    else:
        scale = np.float32((hi - lo) / (qmax - qmin))
        zp = int(np.clip(qmin - np.rint(lo / scale), qmin, qmax))
    return (np.clip(np.rint(x / scale) + zp, qmin, qmax) - zp) * scale


def test_fp32_baseline(trained_mnist):
    _, acc = trained_mnist
    assert acc >= 97.0


@pytest.mark.slow
def test_qat_8bit_keeps_accuracy(trained_mnist, mnist, tmp_path):
    model, fp32_acc = trained_mnist
    (xtr, ytr), (xte, yte) = mnist
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    quantizer = QAT_Quantizer(model, CONFIG_8BIT, optimizer)
    assert quantizer.compress() is model
    train_epochs(model, xtr, ytr, epochs=1, optimizer=optimizer)
    assert quantizer.steps == (len(xtr) + 63) // 64  # one per optimizer.step()
    qat_acc = accuracy(model, xte, yte)
    assert qat_acc >= fp32_acc - 0.5, (qat_acc, fp32_acc)

    # export is non-destructive and repeatable
    before = model(xte[:64]).detach()
    paths = [(tmp_path / f"m{i}.pt", tmp_path / f"c{i}.json") for i in range(2)]
    configs = [quantizer.export_model(str(m), str(c)) for m, c in paths]
    assert torch.equal(model(xte[:64]).detach(), before)
    assert configs[0] == configs[1] == load_calibration_config(str(paths[0][1]))
    assert filecmp.cmp(paths[0][0], paths[1][0], shallow=False)
    assert filecmp.cmp(paths[0][1], paths[1][1], shallow=False)

    # the float weights load into the user's own model class, safely
    plain = MnistNet()
    plain.load_state_dict(torch.load(paths[0][0], weights_only=True))
    assert torch.equal(plain.conv1.weight, model.conv1.module.weight)
    assert set(layer_entries(configs[0])) == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3"}
    assert {"weight_scale", "tracked_min_input"} <= set(configs[0]["fc1"])
    assert {"tracked_min_output", "tracked_max_output"} <= set(configs[0]["relu2"])


def test_fake_quant_equals_numpy_with_exported_params(trained_mnist, mnist):
    model, _ = trained_mnist
    (xtr, _), (xte, _) = mnist
    quantizer = ObserverQuantizer(model, CONFIG_8BIT)
    model.eval()
    with torch.no_grad():
        model(xtr[:500])
    quantizer.compress()
    calib = quantizer.calibration_config()
    captured = {}
    model.conv2.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    model.relu2.register_forward_hook(lambda m, i, o: captured.update(r_in=i[0], r_out=o))
    with torch.no_grad():
        model(xte[:32])
    c = calib["conv2"]
    x = captured["x"].numpy()
    xq = np_fake_quant(x, c["tracked_min_input"], c["tracked_max_input"], 8, c["input_scheme"], c["input_dtype"])
    w = model.conv2.module.weight.detach().numpy()
    scale = np.array(c["weight_scale"], np.float32)
    wq = np.clip(np.rint(w / scale[:, None, None, None]), -128, 127) * scale[:, None, None, None]
    # the bias as the engine holds it: int32 codes on the grid input_scale * weight_scale
    lo, hi = min(c["tracked_min_input"], 0.0), max(c["tracked_max_input"], 0.0)
    bias_step = np.float32(np.float32((hi - lo) / 255) * scale)
    bias = model.conv2.module.bias.detach().numpy().astype(np.float64)
    bq = (np.rint(bias / bias_step.astype(np.float64)) * bias_step).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(xq.astype(np.float32)), torch.from_numpy(wq.astype(np.float32)),
                   torch.from_numpy(bq))
    torch.testing.assert_close(captured["y"], ref, rtol=1e-5, atol=1e-5)
    r = calib["relu2"]
    rq = np_fake_quant(np.clip(captured["r_in"].numpy(), 0, 6), r["tracked_min_output"], r["tracked_max_output"], 8,
                       r["output_scheme"], r["output_dtype"])
    np.testing.assert_allclose(captured["r_out"].numpy(), rq, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_observer_ptq_keeps_accuracy(trained_mnist, mnist, observer):
    model, fp32_acc = trained_mnist
    (xtr, _), (xte, yte) = mnist
    config = [dict(entry, observer=observer) for entry in CONFIG_8BIT]
    quantizer = ObserverQuantizer(model, config)
    model.eval()
    with torch.no_grad():
        for i in range(0, 1024, 256):
            model(xtr[i:i + 256])
    quantizer.compress()
    assert accuracy(model, xte, yte) >= fp32_acc - 1.0
    assert quantizer.calibration_config()["conv1"]["weight_scheme"] == "per_channel_symmetric"


def test_naive_quantizer_weight_only(trained_mnist, mnist, tmp_path):
    model, fp32_acc = trained_mnist
    _, (xte, yte) = mnist
    quantizer = NaiveQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}])
    quantizer.compress()
    assert accuracy(model, xte, yte) >= fp32_acc - 0.5
    calib = quantizer.export_model(str(tmp_path / "m.pt"), str(tmp_path / "c.json"))
    assert set(calib) == {"conv1", "conv2", "fc1", "fc2"}
    w = model.fc2.module.weight.detach()
    scale = torch.tensor(calib["fc2"]["weight_scale"])
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)


def test_quant_start_step_and_forward_step_counting(trained_mnist, mnist):
    model, _ = trained_mnist
    (xtr, _), _ = mnist
    reference = copy.deepcopy(model).eval()
    config = [dict(entry, quant_start_step=3) for entry in CONFIG_8BIT]
    quantizer = QAT_Quantizer(model, config)  # no optimizer, no dummy_input
    model.train()
    for step in range(3):
        assert quantizer.steps == step
        out = model(xtr[:16])
        torch.testing.assert_close(out, reference(xtr[:16]))  # not quantized yet (no BN, no dropout)
    assert quantizer.steps == 3
    assert not torch.allclose(model(xtr[:16]), reference(xtr[:16]))
    assert quantizer.steps == 4
    model.eval()
    model(xtr[:16])
    assert quantizer.steps == 4  # eval forwards do not count


@pytest.mark.parametrize("backend", ["onnxruntime", None])
def test_nan_input_names_the_layer(trained_mnist, backend):
    model, _ = trained_mnist
    ObserverQuantizer(model, CONFIG_8BIT, backend=backend)
    model(torch.zeros(2, 1, 28, 28))
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="layer 'conv1'"):
        model(x)


def test_nan_first_batch_is_refused_before_placement(trained_mnist):
    model, _ = trained_mnist
    ObserverQuantizer(model, CONFIG_8BIT)
    x = torch.zeros(2, 1, 28, 28)
    x[1, 0, 3, 3] = float("inf")
    with pytest.raises(NonFiniteTensorError, match="input 0 of the model"):
        model(x)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_qat_batchnorm_folding_simulates_the_folded_integer_conv():
    torch.manual_seed(0)
    model = ConvBN()
    x = torch.randn(16, 3, 10, 10)
    model.train()
    for _ in range(3):
        model(x)  # give BN non-trivial running statistics
    with torch.no_grad():
        model.bn.weight.copy_(torch.linspace(-1.5, 2.0, 8))
    quantizer = QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d"]}],
                              dummy_input=x[:1], backend=None)  # the weights alone, as the config says
    calib = quantizer.calibration_config()
    assert calib["conv"]["folded_bn"] == "bn"
    model.eval()
    with torch.no_grad():
        out = model(x)
        conv, bn = model.conv.module, model.bn
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w_fold = (conv.weight * factor[:, None, None, None]).numpy()
        scale = np.array(calib["conv"]["weight_scale"], np.float32)[:, None, None, None]
        w_int = np.clip(np.rint(w_fold / scale), -8, 7)
        b_fold = (conv.bias - bn.running_mean) * factor + bn.bias
        ref = F.relu(F.conv2d(x, torch.from_numpy((w_int * scale).astype(np.float32)), b_fold))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(np.unique(w_int)) <= 16


def test_unwrapped_copy_is_the_float_model(trained_mnist, mnist):
    model, _ = trained_mnist
    _, (xte, _) = mnist
    reference = copy.deepcopy(model).eval()
    QAT_Quantizer(model, CONFIG_8BIT)
    plain = unwrapped_copy(model).eval()
    assert not any(type(m).__name__ == "QuantizerModuleWrapper" for m in plain.modules())
    torch.testing.assert_close(plain(xte[:8]), reference(xte[:8]))


def test_export_writes_fp32_onnx_matching_the_float_model(trained_mnist, mnist, tmp_path):
    import onnxruntime as ort
    model, _ = trained_mnist
    _, (xte, _) = mnist
    reference = copy.deepcopy(model).eval()
    config = [dict(CONFIG_8BIT[0], observer={"weight": "mse", "input": "percentile"}), CONFIG_8BIT[1]]
    quantizer = ObserverQuantizer(model, config)
    model.eval()
    with torch.no_grad():
        model(xte[:256])
    quantizer.compress()
    quantizer.export_model(None, onnx_path=str(tmp_path / "m.onnx"), input_shape=(1, 1, 28, 28))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: xte[:50].numpy()})[0]  # dynamic batch axis
    np.testing.assert_allclose(out, reference(xte[:50]).detach().numpy(), rtol=1e-4, atol=1e-4)
