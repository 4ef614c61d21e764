"""Engine against the quantizer's own simulation on real images (issue #10): trained MNIST and
CIFAR models, natural configs, top-1 agreement >= 99.5%."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mixq.datasets import load_cifar10
from mixq.models import resnet20_cifar
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.precision_report import layer_rows

CHECKPOINT = Path(__file__).resolve().parent / "data" / "resnet20_cifar.pt"
CONFIGS = {
    "weight, input on Conv2d/Linear": [{"quant_types": ["weight", "input"], "quant_bits": 8,
                                        "op_types": ["Conv2d", "Linear"]}],
    "NNI pattern": [{"quant_types": ["weight", "output"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU", "ReLU6"]}],
}


def _agreement(model: torch.nn.Module, config_list, calib: torch.Tensor, test: torch.Tensor, shape) -> float:
    wrapped = copy.deepcopy(model).eval()
    quantizer = ObserverQuantizer(wrapped, config_list)
    with torch.no_grad():
        for i in range(0, len(calib), 128):
            wrapped(calib[i:i + 128])
    quantizer.compress()
    engine = ModelSpeedup(model, shape, config=quantizer.calibration_config(), num_threads=2).compress()
    assert all(r["actual"] == r["requested"] for r in layer_rows(engine.precision_report()))
    with torch.no_grad():
        simulated = torch.cat([wrapped(test[i:i + 500]) for i in range(0, len(test), 500)]).argmax(1)
    out, _ = engine.inference(test)
    return (out.argmax(1) == simulated).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mnist_engine_agrees_with_simulation(trained_mnist, mnist, name):
    model, _ = trained_mnist
    (xtr, _), (xte, _) = mnist
    assert _agreement(model.eval(), CONFIGS[name], xtr[:512], xte, (128, 1, 28, 28)) >= 0.995


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cifar_resnet20_engine_agrees_with_simulation(cifar_root, name):
    """The engine adds each bias as int32 codes on the grid input_scale * weight_scale; the
    simulation rounds it alike (without that, 0.8% of this 78%-accurate model's predictions
    flipped). What remains is float32 near-ties compounding over 20 layers."""
    (xtr, _), (xte, _) = load_cifar10(cifar_root)
    model = resnet20_cifar()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    assert _agreement(model.eval(), CONFIGS[name], xtr[:512], xte[:2500], (128, 3, 32, 32)) >= 0.995
