"""Issue #13, items 2, 3, 11 and 16: a bad-but-parseable calibration never builds a wrong engine.

Each case starts from a real calibration (an ObserverQuantizer on the trained MNIST model) and
changes one value the way a hand-edited or foreign file would; the reference for "wrong" is the
model itself (its module types, weight shapes and what it computes on a batch).
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn

from mixq.compressor import CalibrationError, load_calibration_config, save_calibration_config
from mixq.compressor.calibration import validate_calibration_config
from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.calibration_check import CalibrationMismatchError, check_calibration

CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


@pytest.fixture(scope="module")
def calibrated(mnist):
    """(float MNIST model, its placed int8 calibration, a batch of images)."""
    (xtr, _), _ = mnist
    torch.manual_seed(0)
    model = MnistNet().eval()
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, CONFIG)
    with torch.no_grad():
        wrapped(xtr[:128])
    quantizer.compress()
    return model, quantizer.calibration_config(), xtr[:8]


def _edit(config, change):
    config = json.loads(json.dumps(config))
    change(config)
    return config


def _run(x):
    return lambda m: m(x)


# -- the file on its own (validate_calibration_config / load_calibration_config) ---------------

@pytest.mark.parametrize("change, fragment", [
    (lambda c: c["conv1"]["weight_scale"].__setitem__(0, 1e308), "float32"),          # inf in float32
    (lambda c: c["conv1"]["weight_scale"].__setitem__(0, 1e-45), "float32"),          # a denormal
    (lambda c: c["conv1"].update(tracked_max_input=1e308), "float32 range"),
    (lambda c: c["conv1"].update(weight_bits=12), "1..8 (integer), 16 (fp16) or 32 (fp32)"),
    (lambda c: c["conv1"].update(weight_bits=True), "1..8 (integer)"),
    (lambda c: c["conv1"].update(weight_axis=None), "need weight_axis"),
    (lambda c: c["conv1"].update(weight_axis=-1), "weight_axis"),
    (lambda c: c["conv1"]["weight_zero_point"].__setitem__(0, 10 ** 30), "outside the 8-bit int grid"),
    (lambda c: c["@tensors"][next(iter(c["@tensors"]))].update(bits=12), "1..8"),
    (lambda c: c["conv1"].update(input_bits=1, input_scheme="per_tensor_symmetric"), "at least 2 bits"),
    (lambda c: c["conv1"].update(input_scheme="per_channel_affine"), "activations are quantized per tensor"),
])
def test_bad_values_are_refused_naming_layer_and_key(calibrated, tmp_path, change, fragment):
    _, config, _ = calibrated
    bad = _edit(config, change)
    with pytest.raises(CalibrationError, match=re.escape(fragment)):
        validate_calibration_config(bad)
    path = tmp_path / "c.json"
    save_calibration_config(config, str(path))
    document = json.loads(path.read_text())
    document["layers"], document["tensors"] = ({k: v for k, v in bad.items() if not k.startswith("@")},
                                               bad["@tensors"])
    path.write_text(json.dumps(document))
    with pytest.raises(CalibrationError, match=re.escape(fragment)) as info:
        load_calibration_config(str(path))
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("version", [True, 1.0, "2", None])
def test_version_must_be_an_int(tmp_path, version):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "mixq-calibration", "version": version,
                                "layers": {"fc1": {"type": "Linear", "weight_bits": 16}}}))
    with pytest.raises(CalibrationError, match="calibration format version"):
        load_calibration_config(str(path))


def test_deeply_nested_and_huge_values_are_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CalibrationError, match="nested too deeply"):
        load_calibration_config(str(path))
    with pytest.raises(CalibrationError) as info:
        validate_calibration_config({"x" * 10 ** 6: {"type": "y" * 10 ** 6, "weight_bits": 16, "z" * 10 ** 6: 1}})
    assert len(str(info.value)) < 400


# -- the calibration against the model (check_calibration) -------------------------------------

def test_a_real_calibration_fits_its_model(calibrated):
    model, config, x = calibrated
    check_calibration(model, config, _run(x))


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c.update(pool1={"type": "Conv2d", "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 6.0,
                               "input_scheme": "per_tensor_affine", "input_dtype": "uint"}),
     "'pool1': 'type' is 'Conv2d', but 'pool1' is a MaxPool2d"),
    (lambda c: c.update(pool1={"type": "MaxPool2d", "weight_bits": 16}), "'pool1' is a MaxPool2d, which has no weight"),
    (lambda c: c["conv1"].update(weight_axis=7), "weight_axis = 7, but the output channels of 'conv1'"),
    (lambda c: c["conv1"].update(weight_axis=1), "weight_axis = 1"),
    (lambda c: c["conv1"].update(weight_scale=c["conv1"]["weight_scale"][:5],
                                 weight_zero_point=c["conv1"]["weight_zero_point"][:5]),
     "5 weight_scale values for the 20 output channels of 'conv1'"),
    (lambda c: c["conv1"].update(tracked_min_input=0.0, tracked_max_input=0.0),
     "'conv1': tracked_min_input = tracked_max_input = 0, but this tensor is not 0"),
    (lambda c: c["@tensors"]["@input0"].update(tracked_min=0.0, tracked_max=0.0),
     "'@input0': tracked_min = tracked_max = 0, but this tensor is not 0"),
])
def test_calibration_of_another_model_is_refused(calibrated, change, fragment):
    model, config, x = calibrated
    bad = _edit(config, change)
    validate_calibration_config(bad)  # well-formed on its own
    with pytest.raises(CalibrationMismatchError, match=re.escape(fragment)) as info:
        check_calibration(model, bad, _run(x))
    assert isinstance(info.value, ValueError)  # callers catching ValueError see it too
    assert "export the calibration" in str(info.value) or "calibrate again" in str(info.value)


class DeadRelu(nn.Module):
    """A ReLU that is 0 on every input (its Linear's bias is very negative), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.relu, self.head = nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.bias.fill_(-1e3)

    def forward(self, x):
        return self.head(self.relu(self.fc(x)))


def test_a_dead_relu_calibrates_to_zero_width_and_builds():
    torch.manual_seed(0)
    model = DeadRelu().eval()
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, [{"quant_types": ["weight", "input"], "quant_bits": 8,
                                             "op_types": ["Linear"]}])
    with torch.no_grad():
        wrapped(torch.randn(64, 8))
    quantizer.compress()
    config = quantizer.calibration_config()
    assert (config["head"]["tracked_min_input"], config["head"]["tracked_max_input"]) == (0.0, 0.0)
    check_calibration(model, config, _run(torch.randn(2, 8)))
    engine = ModelSpeedup(model, (4, 8), config=config).compress()
    x = torch.randn(5, 8)
    torch.testing.assert_close(engine.inference(x)[0], model(x), atol=1e-3, rtol=1e-3)


# -- the same through ModelSpeedup ---------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    (lambda c: c["conv1"]["weight_scale"].__setitem__(0, 1e308), "float32"),
    (lambda c: c["conv1"]["weight_scale"].__setitem__(0, 1e-45), "float32"),
    (lambda c: c["conv1"]["weight_scale"].__setitem__(3, 1e-30), "channel 3: 100% of its weights fall outside"),
    (lambda c: c["conv1"].update(weight_axis=7), "weight_axis"),
    (lambda c: c["conv1"].update(weight_scale=c["conv1"]["weight_scale"][:5],
                                 weight_zero_point=c["conv1"]["weight_zero_point"][:5]), "5 weight_scale values"),
    pytest.param(lambda c: c.update(pool1={"type": "Conv2d", "input_bits": 8, "tracked_min_input": 0.0,
                                           "tracked_max_input": 6.0, "input_scheme": "per_tensor_affine",
                                           "input_dtype": "uint"}), "MaxPool2d"),
    pytest.param(lambda c: c["@tensors"]["@input0"].update(tracked_min=0.0, tracked_max=0.0), "not 0",),
])
def test_modelspeedup_refuses_before_building(calibrated, change, fragment):
    model, config, _ = calibrated
    with pytest.raises((CalibrationError, ValueError), match=re.escape(fragment)) as info:
        ModelSpeedup(model, (8, 1, 28, 28), config=_edit(config, change)).compress()
    assert len(str(info.value).splitlines()) == 1
