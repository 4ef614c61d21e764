"""ReconstructionQuantizer (AdaRound + QDrop block reconstruction, PTMQ multi-bit activations)
on the CIFAR ResNet-20 checkpoint, against round-to-nearest PTQ and the fp32 model.

Budgets (the whole file must stay within a few minutes on 2 CPU cores): N_CALIB calibration
images (the first of data_batch_1), batch 32, *_ITERATIONS steps per unit (11 units), accuracy on
the first N_TEST test images; the multi-bit ordering is judged by the logits' SQNR against fp32,
which separates 3- from 4-bit activations on N_TEST images where accuracy would need all 10,000.
The iteration budgets (8 to 80 steps per unit) are far below the 300 that benchmarks/reconstruction.py
uses for the README figures.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mixq.compressor import ConfigError
from mixq.datasets import load_cifar10
from mixq.models import MnistNet, accuracy, resnet20_cifar
from mixq.quantizers import ObserverQuantizer, ReconstructionQuantizer
from mixq.quantizers.blocks import find_units

CHECKPOINT = Path(__file__).resolve().parent / "data" / "resnet20_cifar.pt"
SCHEME = {"quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
          "quant_dtype": {"weight": "int", "input": "uint"}}
N_TEST = 2000
N_CALIB = 512
W3A3_ITERATIONS = 80   # the hard case: enough steps for AdaRound to settle most roundings
W4A4_ITERATIONS = 40   # round-to-nearest already loses only ~2 points at W4A4
MULTI_ITERATIONS = 8   # each multi-bit step runs four forwards and backwards (mixed, high, mid, low)


def config_list(weight_bits, act_bits):
    """W/A bits on every conv/linear weight and input; the first and last layers at 8 bits."""
    return [{"quant_types": ["weight", "input"], "quant_bits": {"weight": weight_bits, "input": act_bits},
             "op_types": ["Conv2d", "Linear"], **SCHEME},
            {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1", "fc"], **SCHEME}]


def load_model():
    model = resnet20_cifar()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def best_round_to_nearest(model, configs, calib, x, y):
    """Best ObserverQuantizer accuracy with MSE-searched weight ranges over three activation observers."""
    best = 0.0
    for act_observer in ("minmax", {"name": "percentile", "percentile": 99.99}, "mse"):
        clone = copy.deepcopy(model)
        quantizer = ObserverQuantizer(clone, [dict(e, observer={"weight": "mse", "input": act_observer})
                                              for e in configs])
        with torch.no_grad():
            clone(calib)
        quantizer.compress()
        best = max(best, accuracy(clone, x, y))
    return best


@pytest.fixture(scope="module")
def cifar_all(cifar_root):
    return load_cifar10(cifar_root)


@pytest.fixture(scope="module")
def cifar(cifar_all):
    (xtr, _), (xte, yte) = cifar_all
    return xtr[:N_CALIB], xte[:N_TEST], yte[:N_TEST]


@pytest.fixture(scope="module")
def fp32(cifar):
    model = load_model()
    _, x, y = cifar
    return model, accuracy(model, x, y)


def _reconstruct(model, bits, calib, iterations, **options):
    clone = copy.deepcopy(model)
    quantizer = ReconstructionQuantizer(clone, config_list(*bits), calib, iterations=iterations, progress=False,
                                        num_samples=len(calib), **options)
    assert quantizer.compress() is clone
    return clone, quantizer


@pytest.fixture(scope="module")
def w3a3(fp32, cifar):
    calib, x, y = cifar
    model, quantizer = _reconstruct(fp32[0], (3, 3), calib, W3A3_ITERATIONS)
    return model, quantizer, accuracy(model, x, y)


def test_checkpoint_accuracy(fp32):
    assert fp32[1] >= 75.0  # 77.7% on all 10,000 test images (benchmarks/train_cifar_resnet.py)


@pytest.mark.slow
def test_w3a3_beats_round_to_nearest(fp32, w3a3, cifar):
    calib, x, y = cifar
    rtn = best_round_to_nearest(fp32[0], config_list(3, 3), calib, x, y)
    recon = w3a3[2]
    assert recon >= rtn + 5.0, (recon, rtn)
    assert recon >= fp32[1] - 5.0, (recon, fp32[1])


@pytest.mark.slow
def test_w4a4_close_to_fp32(fp32, cifar):
    calib, x, y = cifar
    model, _ = _reconstruct(fp32[0], (4, 4), calib, W4A4_ITERATIONS)
    recon = accuracy(model, x, y)
    assert recon >= fp32[1] - 1.5, (recon, fp32[1])


def _folded(model, conv, bn):
    m = model.get_submodule
    gamma, var, eps = m(bn).weight, m(bn).running_var, m(bn).eps
    factor = (gamma / torch.sqrt(var + eps)).detach().numpy()
    return m(conv).weight.detach().numpy() * factor.reshape(-1, 1, 1, 1)


@pytest.mark.slow
def test_rounding_is_binary_and_export_reproduces_it(fp32, w3a3, tmp_path):
    original, (_, quantizer, _) = fp32[0], w3a3
    # the regulariser drove most soft rounding values to exactly 0 or 1 within the short budget
    # (the rest are decided by h(V) >= 0.5 at the end; what deploys is binary either way, below)
    values = torch.cat([v.flatten() for v in quantizer.rounding_values.values()])
    settled = torch.minimum(values, 1 - values)
    assert (settled == 0).float().mean() >= 0.6 and (settled <= 0.1).float().mean() >= 0.7

    calib = quantizer.export_model(str(tmp_path / "w.pt"), str(tmp_path / "c.json"))
    exported = resnet20_cifar()
    exported.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    changed = 0
    for name, entry in calib.items():
        if entry.get("folded_bn") is None:
            continue
        scale = np.asarray(entry["weight_scale"], dtype=np.float32).reshape(-1, 1, 1, 1)
        qmax = 2 ** (entry["weight_bits"] - 1) - 1
        # deployment: fold BN into the exported float weight, round to nearest with the exported scale
        deployed = np.clip(np.rint(_folded(exported, name, entry["folded_bn"]) / scale), -qmax - 1, qmax)
        # every integer is the original weight rounded down or up, never further
        start = np.floor(_folded(original, name, entry["folded_bn"]) / scale)
        assert set(np.unique(deployed - np.clip(start, -qmax - 1, qmax))) <= {0.0, 1.0}, name
        nearest = np.clip(np.rint(_folded(original, name, entry["folded_bn"]) / scale), -qmax - 1, qmax)
        changed += int((deployed != nearest).sum())
        # and it is exactly what the reconstructed model computes
        wrapper = quantizer.modules_wrapper[name]
        simulated = quantizer.quantize_weight(wrapper, wrapper.effective_weight()).detach().numpy()
        np.testing.assert_allclose(simulated, deployed * scale, rtol=0, atol=1e-6 * float(scale.max()))
    assert changed > 0  # AdaRound moved some weights off round-to-nearest


def _sqnr_db(out, reference):
    return float(10 * torch.log10(reference.pow(2).sum() / (out - reference).pow(2).sum()))


@pytest.mark.slow
def test_activation_bits_switch_monotonically(fp32, cifar):
    # W8 weights, so that the three levels differ by their activations only; judged on half the
    # test images (each fake-quantized forward of 2,000 images takes seconds)
    calib, x, y = cifar
    x, y = x[:N_TEST // 2], y[:N_TEST // 2]
    with torch.no_grad():
        reference = fp32[0](x)
    model, quantizer = _reconstruct(fp32[0], (8, 4), calib, MULTI_ITERATIONS, activation_bits=(2, 3, 4))
    sqnr, outputs, acc = {}, {}, {}
    for level in ("low", "mid", "high", "low"):
        quantizer.set_activation_bits(level)
        with torch.no_grad():
            out = model(x)
        if level in outputs:  # switching back recomputes nothing: identical outputs
            assert torch.equal(out, outputs[level])
            continue
        outputs[level], sqnr[level] = out, _sqnr_db(out, reference)
        acc[level] = float((out.argmax(1) == y).float().mean() * 100)
        cfg = quantizer.calibration_config()
        assert cfg["layer2.1.conv1"]["input_bits"] == {"low": 2, "mid": 3, "high": 4}[level]
        assert cfg["conv1"]["input_bits"] == cfg["fc"]["input_bits"] == 8
    assert sqnr["high"] > sqnr["mid"] + 1.0 and sqnr["mid"] > sqnr["low"] + 1.0, sqnr
    assert acc["high"] >= acc["low"] + 1.0 and acc["high"] >= fp32[1] - 3.0, (acc, fp32[1])


def test_units_are_found():
    units = [u.name for u in find_units(resnet20_cifar().eval(), torch.randn(2, 3, 32, 32))]
    assert units == ["conv1+bn1+relu"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["fc"]
    units = [u.name for u in find_units(MnistNet().eval(), torch.randn(2, 1, 28, 28))]
    assert units == ["conv1+relu1", "conv2+relu2", "fc1+relu3", "fc2"]


@pytest.mark.parametrize("options, message", [
    ({"rounding": "stochastic"}, "rounding must be one of"),
    ({"drop_prob": 1.0}, "drop_prob"),
    ({"activation_bits": (4, 3, 8)}, "three increasing ints"),
    ({"blocks": ["layer1.0", "layer1.9"]}, r"blocks\[1\]: .layer1.9. is not a module.*close matches: layer1"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        ReconstructionQuantizer(resnet20_cifar(), config_list(4, 4), torch.randn(4, 3, 32, 32), **options)


def test_switching_needs_multi_bit_and_compress():
    quantizer = ReconstructionQuantizer(resnet20_cifar().eval(), config_list(4, 4), torch.randn(4, 3, 32, 32),
                                        activation_bits=(2, 4, 8), iterations=0, progress=False)
    with pytest.raises(RuntimeError, match="compress"):
        quantizer.set_activation_bits("low")
    with pytest.raises(RuntimeError, match="compress"):
        quantizer.calibration_config()
    quantizer.compress()
    with pytest.raises(ValueError, match="level must be one of"):
        quantizer.set_activation_bits("medium")
