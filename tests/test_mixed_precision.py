"""layer_sensitivity and auto_mixed_precision on the CIFAR ResNet-20 checkpoint.

W4A4 round-to-nearest (ObserverQuantizer; MSE weight ranges, min/max activation ranges, which
do not depend on how the calibration data is batched) is used because it loses a few points, so the
sensitivity ordering and the accuracy goal are meaningful; 256 calibration images, accuracy
on the first N_TEST test images.
"""
import copy
import math
from pathlib import Path

import pytest
import torch

from mixq.compressor import QuantizerModuleWrapper
from mixq.search import (LayerSensitivity, auto_mixed_precision, format_sensitivity_table, layer_costs,
                         layer_sensitivity)
from mixq.datasets import load_cifar10
from mixq.models import accuracy, resnet20_cifar
from mixq.quantizers import ObserverQuantizer

CHECKPOINT = Path(__file__).resolve().parent / "data" / "resnet20_cifar.pt"
N_TEST = 1000
N_CALIB = 256
W4A4 = [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"],
         "quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
         "quant_dtype": {"weight": "int", "input": "uint"}, "observer": {"weight": "mse", "input": "minmax"}}]


@pytest.fixture(scope="module")
def setup(cifar_root):
    (xtr, _), (xte, yte) = load_cifar10(cifar_root)
    model = resnet20_cifar()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval(), xtr[:N_CALIB], xte[:N_TEST], yte[:N_TEST]


def _ptq(model, config, calib):
    """Independent reference: ObserverQuantizer on a copy with ``config``."""
    clone = copy.deepcopy(model)
    quantizer = ObserverQuantizer(clone, config)
    with torch.no_grad():
        clone(calib)
    quantizer.compress()
    return clone


@pytest.fixture(scope="module")
def table(setup):
    model, calib, _, _ = setup
    before = copy.deepcopy(model.state_dict())
    rows = layer_sensitivity(model, W4A4, calib)
    assert not any(isinstance(m, QuantizerModuleWrapper) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return rows


@pytest.mark.slow
def test_sensitivity_table_is_sorted_and_matches_single_layer_ptq(setup, table):
    model, calib, _, _ = setup
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(r.name for r in table) == sorted(convs)
    assert [r.sqnr_db for r in table] == sorted(r.sqnr_db for r in table)
    assert all(math.isfinite(r.sqnr_db) and r.kl >= 0 for r in table)
    print("\n" + format_sensitivity_table(table))
    with torch.no_grad():
        reference = model(calib)
    for row in (table[0], table[-1]):  # each row is that layer quantized alone (the others not configured at all)
        alone = _ptq(model, [dict(W4A4[0], op_names=[row.name])], calib)
        with torch.no_grad():
            noise = (alone(calib) - reference).pow(2).sum()
        assert row.sqnr_db == pytest.approx(10 * math.log10(reference.pow(2).sum() / noise), abs=1e-3)


@pytest.mark.slow
def test_max_drop_goal_is_met_by_the_returned_config(setup, table):
    model, calib, x, y = setup
    fp32 = accuracy(model, x, y)
    uniform = accuracy(_ptq(model, W4A4, calib), x, y)
    assert fp32 - uniform > 1.0, "W4A4 must lose more than the goal for this test to mean something"
    config = auto_mixed_precision(model, W4A4, calib, lambda m: accuracy(m, x, y), max_drop=1.0, sensitivity=table)
    kept = config[-1]["op_names"]
    assert config[:-1] == W4A4 and config[-1]["exclude"] is True
    assert 0 < len(kept) < len(table)
    assert accuracy(_ptq(model, config, calib), x, y) >= fp32 - 1.0


@pytest.mark.slow
def test_budget_goal_keeps_cost_and_improves_accuracy(setup, table):
    model, calib, x, y = setup
    config = auto_mixed_precision(model, W4A4, calib, budget=1.25, cost="latency", sensitivity=table)
    kept = set(config[-1]["op_names"])
    costs = layer_costs(model, [r.name for r in table], calib, "latency")
    uniform = sum(q for q, _ in costs.values())
    mixed = sum(f if n in kept else q for n, (q, f) in costs.items())
    assert uniform < mixed <= 1.25 * uniform
    assert accuracy(_ptq(model, config, calib), x, y) > accuracy(_ptq(model, W4A4, calib), x, y)


def test_budget_with_measured_cost_keeps_layers_that_fit_in_sensitivity_order():
    rows = [LayerSensitivity(name, "Conv2d", {"weight": 8, "input": 8}, sqnr, 0.0)
            for name, sqnr in (("a", 20.0), ("b", 30.0), ("c", 40.0), ("d", 10.0))]
    added = {"a": 0.5, "b": 0.2, "c": 0.1, "d": 2.0}
    measured = []

    def cost(config_list):  # uniform: 4.0; float layers add their cost, two or more another 0.1 each
        kept = config_list[-1]["op_names"] if config_list[-1].get("exclude") else []
        measured.append(list(kept))
        return 4.0 + sum(added[n] for n in kept) + 0.1 * max(len(kept) - 1, 0)

    config = auto_mixed_precision(resnet20_cifar(), W4A4, torch.randn(4, 3, 32, 32), budget=1.25, cost=cost,
                                  sensitivity=rows)
    # limit 5.0; sensitivity order d (6.0: no), a (4.5), b (4.8), c (5.0: yes, exactly the limit)
    assert config[-1] == {"exclude": True, "op_names": ["a", "b", "c"]}
    assert measured == [[], ["d"], ["a"], ["a", "b"], ["a", "b", "c"]]  # one measurement per candidate


@pytest.mark.parametrize("goal, message", [
    ({}, "exactly one goal"),
    ({"max_drop": 1.0, "budget": 1.2}, "exactly one goal"),
    ({"max_drop": 1.0}, "max_drop needs eval_fn"),
    ({"budget": 0.9}, "must be >= 1"),
])
def test_goal_errors(goal, message):
    with pytest.raises(ValueError, match=message):
        auto_mixed_precision(resnet20_cifar(), W4A4, torch.randn(4, 3, 32, 32), **goal)
