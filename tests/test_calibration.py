"""Calibration file: JSON round trip, versioning and validation of every field."""
import json

import pytest
from schema import SchemaError

from mixq.compressor import CalibrationError, load_calibration_config, save_calibration_config
from mixq.compressor.calibration import FORMAT_VERSION

GOOD = {
    "conv1": {"type": "Conv2d", "weight_bits": 8, "weight_scale": [0.01, 0.02], "weight_zero_point": [0, 0],
              "weight_scheme": "per_channel_symmetric", "weight_axis": 0, "weight_dtype": "int", "folded_bn": None,
              "input_bits": 8, "tracked_min_input": -0.4, "tracked_max_input": 2.8,
              "input_scheme": "per_tensor_symmetric", "input_dtype": "int"},
    "fc2": {"type": "Linear", "weight_bits": 16},
    "relu1": {"type": "ReLU6", "output_bits": 8, "tracked_min_output": 0.0, "tracked_max_output": 6.0,
              "output_scheme": "per_tensor_affine", "output_dtype": "uint"},
}


def test_round_trip(tmp_path):
    path = tmp_path / "calib.json"
    save_calibration_config(GOOD, str(path))
    assert load_calibration_config(str(path)) == GOOD
    document = json.loads(path.read_text())
    assert document["format"] == "mixq-calibration" and document["version"] == FORMAT_VERSION == 2
    assert not list(tmp_path.glob(".tmp-*")), "temp file left behind"


def _write(path, document):
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.update(version=3), "version 3"),
    (lambda d: d.update(version=True), "version True"),
    (lambda d: d.update(tensors={"@0/add_#0": {"bits": 8}}), "without the other"),
    (lambda d: d.update(tensors={"@0/add_#0": {"bits": 8, "scheme": "per_tensor_affine", "dtype": "uint",
                                               "tracked_min": 1.0, "tracked_max": 0.5}},
                        placement={"backend": "onnxruntime"}), "tracked_min 1.0 > tracked_max"),
    (lambda d: d.update(tensors={}, placement={"backend": "tvm"}), "backend"),
    (lambda d: d.pop("format"), "not a mixq calibration file"),
    (lambda d: d["layers"]["conv1"].pop("weight_scale"), "missing weight_scale"),
    (lambda d: d["layers"]["conv1"].update(weight_bits="8"), "weight_bits"),
    (lambda d: d["layers"]["conv1"].update(weight_scale=[0.01, -1.0]), "positive"),
    (lambda d: d["layers"]["conv1"].update(weight_zero_point=[0]), "2 weight scales but 1 zero points"),
    (lambda d: d["layers"]["conv1"].update(tracked_min_input=3.0), "tracked_min_input 3.0 > tracked_max_input"),
    (lambda d: d["layers"]["relu1"].update(output_scheme="per_tensor"), "output_scheme"),
    (lambda d: d["layers"]["relu1"].update(tracked_max_output=float("inf")), "finite"),
    (lambda d: d["layers"]["relu1"].update(unknown_key=1), "unknown_key"),
    (lambda d: d["layers"].update(fc2={"type": "Linear"}), "no weight_bits"),
    (lambda d: d.update(layers=[1, 2]), "must map module names"),
])
def test_bad_files_are_rejected(tmp_path, mutate, fragment):
    document = {"format": "mixq-calibration", "version": 1, "layers": json.loads(json.dumps(GOOD))}
    mutate(document)
    path = _write(tmp_path / "c.json", document)
    with pytest.raises(SchemaError) as info:
        load_calibration_config(path)
    assert isinstance(info.value, CalibrationError)
    assert fragment in str(info.value)


def test_not_json_and_pickle_are_rejected(tmp_path):
    import pickle
    path = tmp_path / "c.json"
    path.write_bytes(pickle.dumps(GOOD))
    with pytest.raises(CalibrationError, match="not a calibration JSON"):
        load_calibration_config(str(path))


def test_save_refuses_invalid_config(tmp_path):
    with pytest.raises(CalibrationError):
        save_calibration_config({"conv1": {"weight_bits": 8}}, str(tmp_path / "c.json"))
    assert not (tmp_path / "c.json").exists()
