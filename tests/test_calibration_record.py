"""The typed calibration record (issue #14): the NNI-keyed dict and its JSON file are its
serialised form, the scheme is an enum."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixq.compressor import CalibrationError, load_calibration_config, save_calibration_config
from mixq.compressor.calibration import validate_calibration_config
from mixq.compressor.calibration_record import CalibrationRecord, LayerCalibration, QuantParams
from mixq.compressor.scheme import Scheme
from mixq.models import MnistNet
from mixq.quantizers import NaiveQuantizer, ObserverQuantizer, QAT_Quantizer

WEIGHT_INPUT = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
                {"quant_types": ["weight"], "quant_bits": 16, "op_names": ["fc2"]}]


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _observer(backend):
    x, _ = _data()
    torch.manual_seed(0)
    model = MnistNet().eval()
    quantizer = ObserverQuantizer(model, [dict(e, observer="mse") for e in WEIGHT_INPUT], backend=backend)
    with torch.no_grad():
        model(x)
    quantizer.compress()
    return quantizer


def _qat(backend):
    x, y = _data()
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, WEIGHT_INPUT, optimizer, dummy_input=x[:2], backend=backend)
    for i in range(0, 64, 16):
        optimizer.zero_grad()
        F.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
        optimizer.step()
    return quantizer


def _naive(_backend):
    torch.manual_seed(0)
    return NaiveQuantizer(MnistNet(), [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                                       {"quant_types": ["weight"], "quant_bits": 4, "op_names": ["fc2"],
                                        "quant_scheme": "per_tensor_symmetric"}])


QUANTIZERS = [(_observer, "onnxruntime"), (_observer, None), (_qat, "onnxruntime"), (_qat, None), (_naive, None)]


@pytest.mark.parametrize("make,backend", QUANTIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_dict_to_record_to_dict_is_identical(make, backend, tmp_path):
    quantizer = make(backend)
    exported = quantizer.export_model(None, str(tmp_path / "a.json"))
    record = CalibrationRecord.from_dict(exported)
    assert record.to_dict() == exported
    assert quantizer.calibration_record() == record
    save_calibration_config(record.to_dict(), str(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert CalibrationRecord.from_dict(load_calibration_config(str(tmp_path / "a.json"))) == record
    if "@tensors" in exported:
        assert list(record.tensors) == list(exported["@tensors"]) and record.backend == exported["@placement"]["backend"]


def test_typed_fields_hold_the_measured_values():
    quantizer = _naive(None)
    record = quantizer.calibration_record()
    conv1 = record.layers["conv1"]
    assert conv1.type == "Conv2d" and conv1.input is None and conv1.folded_bn is None
    w = quantizer.bound_model.conv1.module.weight.detach()
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    assert conv1.weight.scheme is Scheme.PER_CHANNEL_SYMMETRIC and conv1.weight.axis == 0
    assert conv1.weight.scale == pytest.approx((amax / 127).tolist(), rel=1e-6)
    assert conv1.weight.zero_point == (0,) * 20 and conv1.weight.integer
    fc2 = record.layers["fc2"]
    assert fc2.weight.scheme is Scheme.PER_TENSOR_SYMMETRIC and fc2.weight.axis is None and fc2.weight.bits == 4
    amax = quantizer.bound_model.fc2.module.weight.detach().abs().max()
    assert fc2.weight.scale == pytest.approx([float(amax) / 7], rel=1e-6)
    assert fc2.to_dict()["weight_axis"] is None
    fp16 = LayerCalibration("Linear", QuantParams(16))
    assert fp16.to_dict() == {"type": "Linear", "weight_bits": 16} and not fp16.weight.integer


def test_placed_record_has_tensors_and_layers_served_by_them():
    quantizer = _observer("onnxruntime")
    record = quantizer.calibration_record()
    assert record.backend == "onnxruntime" and record.tensors
    plan = quantizer.point_plan
    for name, layer in record.layers.items():
        key = plan.serves.get(name, {}).get("input")
        if key is not None:
            assert layer.input == record.tensors[key]
    assert all(p.integer and p.has_range and p.scheme in Scheme for p in record.tensors.values())


def test_record_is_read_only():
    record = CalibrationRecord({"fc": LayerCalibration("Linear", QuantParams(16))})
    with pytest.raises(TypeError):
        record.layers["fc"] = LayerCalibration()
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.layers["fc"].weight.bits = 8


def test_version_1_file_reads_into_the_same_record(tmp_path):
    layers = {"conv1": {"type": "Conv2d", "weight_bits": 8, "weight_scale": [0.5], "weight_zero_point": [0],
                        "weight_scheme": "per_tensor_symmetric", "weight_axis": None, "weight_dtype": "int",
                        "folded_bn": None, "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 6.0,
                        "input_scheme": "per_tensor_affine", "input_dtype": "uint"}}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"format": "mixq-calibration", "version": 1, "layers": layers}))
    record = CalibrationRecord.from_dict(load_calibration_config(str(path)))
    assert record.to_dict() == layers and record.tensors is None
    conv1 = record.layers["conv1"]
    assert conv1.weight.axis is None and conv1.input.tracked_max == 6.0 and conv1.input.dtype == "uint"


# Scheme ------------------------------------------------------------------------------------------
def test_scheme_enum_is_its_string():
    assert [s.value for s in Scheme] == ["per_tensor_symmetric", "per_tensor_affine", "per_channel_symmetric",
                                         "per_channel_affine"]
    assert Scheme("per_channel_symmetric") is Scheme.PER_CHANNEL_SYMMETRIC == "per_channel_symmetric"
    assert f"{Scheme.PER_TENSOR_AFFINE}" == str(Scheme.PER_TENSOR_AFFINE) == "per_tensor_affine"
    assert json.dumps({"s": Scheme.PER_TENSOR_AFFINE}) == '{"s": "per_tensor_affine"}'
    assert {(s.symmetric, s.per_channel) for s in Scheme} == {(True, False), (False, False), (True, True),
                                                               (False, True)}
    assert Scheme.PER_CHANNEL_AFFINE.per_channel and not Scheme.PER_CHANNEL_AFFINE.symmetric


def test_no_scheme_string_parsing_left_in_the_package():
    package = Path(__file__).resolve().parent.parent / "mixq"
    offenders = [str(p) for p in package.rglob("*.py")
                 if 'endswith("symmetric")' in p.read_text() or 'startswith("per_channel")' in p.read_text()]
    assert offenders == []


# Malformed dicts ---------------------------------------------------------------------------------
GOOD = {"conv1": {"type": "Conv2d", "weight_bits": 8, "weight_scale": [0.01, 0.02], "weight_zero_point": [0, 0],
                  "weight_scheme": "per_channel_symmetric", "weight_axis": 0, "weight_dtype": "int",
                  "folded_bn": None, "input_bits": 8, "tracked_min_input": -0.4, "tracked_max_input": 2.8,
                  "input_scheme": "per_tensor_symmetric", "input_dtype": "int"}}


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c["conv1"].pop("weight_scale"), "missing weight_scale"),
    (lambda c: c["conv1"].update(input_scheme="per_tensor"), "input_scheme"),
    (lambda c: c["conv1"].update(input_scheme="per_channel_affine"), "activations are quantized per tensor"),
    (lambda c: c["conv1"].update(tracked_min_input=3.0), "tracked_min_input 3.0 > tracked_max_input"),
    (lambda c: c["conv1"].update(weight_axis=None), "need weight_axis"),
    (lambda c: c.update({"@tensors": {}}), "without the other"),
    (lambda c: c.update(fc={"type": "Linear"}), "no weight_bits"),
])
def test_malformed_dicts_fail_as_the_validator_does(mutate, fragment):
    config = json.loads(json.dumps(GOOD))
    mutate(config)
    with pytest.raises(CalibrationError) as expected:
        validate_calibration_config(config)
    with pytest.raises(CalibrationError) as got:
        CalibrationRecord.from_dict(config)
    assert str(got.value) == str(expected.value) and fragment in str(got.value)
