"""The mixq console script on a calibration file and a saved engine, and its error paths.

The engine table is checked column by column against values computed here from the data and
the float model (numpy min/max and the scale/zero-point formulas), not against the calibration.
"""
import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from mixq.cli import main
from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup

AFFINE_U8 = {"quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
             "quant_dtype": {"weight": "int", "input": "uint"}}
CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
          {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
          {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1"], **AFFINE_U8},
          {"quant_types": ["weight"], "quant_bits": 16, "op_names": ["fc2"]}]  # fp16: runs fp32 on ORT's CPU
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mnist):
    (xtr, _), _ = mnist
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = MnistNet().eval()
    float_model = copy.deepcopy(model)
    calib = xtr[:256] * 2 - 0.5  # negative values: conv1's affine uint8 input gets a non-zero zero point
    quantizer = ObserverQuantizer(model, CONFIG)
    with torch.no_grad():
        model(calib)
    quantizer.compress()
    calibration = quantizer.export_model(None, str(folder / "calibration.json"))
    engine = ModelSpeedup(model, (1, 1, 28, 28), config=calibration, backend="onnxruntime", batchsize=32)
    engine.compress()
    engine.export_quantized_model(str(folder / "mnist.mixq"))
    return folder, calibration, float_model, calib


def _table(out: str, first: str = "layer") -> dict:
    """Rows of the table whose header starts with ``first``, keyed by its first column, cells
    cut at the header's column starts (the table ends at a blank line)."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{first} "))
    header = lines[at]
    names = header.split()
    starts = [header.index(f"{n} " if n != names[-1] else n) for n in names]
    rows = {}
    for line in lines[at + 2:]:
        if not line.strip():
            break
        cells = [line[s:e].strip() for s, e in zip(starts, starts[1:] + [len(line)])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def _numbers(cell: str) -> list:
    return [float(v) for v in re.findall(NUMBER, cell)]


def _activation(values: torch.Tensor, affine: bool):
    """(min, max, scale, zero point) of a tensor's range: the formulas, in numpy."""
    lo, hi = float(values.min()), float(values.max())
    lo_n, hi_p = min(lo, 0.0), max(hi, 0.0)
    if affine:  # uint8 [0, 255]
        scale = (hi_p - lo_n) / 255
        return lo, hi, scale, int(np.clip(0 - np.round(lo_n / scale), 0, 255))
    return lo, hi, max(-lo_n, hi_p) / 127, 0


def test_inspect_calibration(saved, capsys):
    folder, calibration, _, _ = saved
    assert main(["inspect", str(folder / "calibration.json")]) == 0
    out = capsys.readouterr().out
    layers = _table(out)
    assert set(layers) == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3"}  # not the '@' entries
    conv2 = calibration["conv2"]
    assert (conv2["input_scheme"], conv2["input_dtype"]) == ("per_tensor_affine", "uint")  # u8 after ReLU6 on ORT
    scale = (conv2["tracked_max_input"] - min(conv2["tracked_min_input"], 0.0)) / 255
    assert f"s={scale:.4g}" in layers["conv2"]["input"]  # the derived input scale is shown
    tensors = _table(out, "tensor")
    assert set(tensors) == set(calibration["@tensors"]) and "tensors placed for onnxruntime" in out
    for key, t in calibration["@tensors"].items():
        assert _numbers(tensors[key]["range"])[1:3] == pytest.approx([t["tracked_min"], t["tracked_max"]], rel=1e-3)


def test_inspect_engine_shows_every_column(saved, capsys):
    folder, _, model, calib = saved
    assert main(["inspect", str(folder / "mnist.mixq")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("inputs input [N, 1, 28, 28], outputs output")
    assert out.startswith("onnxruntime ")
    rows = _table(out)
    layers = {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3"}
    assert layers < set(rows)
    for op in set(rows) - layers:  # placed ops outside the config (pooling, flatten): no calibration cells
        assert op.startswith("/") and rows[op]["requested"] == "int8"
        assert rows[op]["weight"] == rows[op]["input"] == rows[op]["output"] == "-"
    assert re.search(r"^\d+\.\d% int8: .* multiply-accumulates", out, re.M)  # the summary line
    with torch.no_grad():
        relu1 = model.relu1(model.conv1(calib))
        relu2 = model.relu2(model.conv2(model.pool1(relu1)))
        fc1_in = torch.flatten(model.pool2(relu2), 1)
        relu3 = model.relu3(model.fc1(fc1_in))
    # ONNX Runtime's placement: u8 (affine) activations after ReLU-like ops; conv1's input by the config
    inputs = {"conv1": (calib, True), "conv2": (model.pool1(relu1), True), "fc1": (fc1_in, True)}
    outputs = {"relu1": relu1, "relu2": relu2, "relu3": relu3}
    for name in ("conv1", "conv2", "fc1"):
        weight = getattr(model, name).weight.detach().numpy()
        scales = np.abs(weight.reshape(len(weight), -1)).max(1) / 127
        cell = rows[name]["weight"]
        assert cell.startswith("8b per_channel_symmetric s=") and cell.endswith(f"({len(weight)} ch)")
        np.testing.assert_allclose(_numbers(cell)[1:3], [scales.min(), scales.max()], rtol=1e-3)
        lo, hi, scale, zp = _activation(*inputs[name])
        cell = rows[name]["input"]
        assert re.fullmatch(rf"8b \[{NUMBER}, {NUMBER}\] s={NUMBER} zp={zp}", cell), cell
        np.testing.assert_allclose(_numbers(cell)[1:4], [lo, hi, scale], rtol=1e-3, atol=1e-6)
        assert rows[name]["output"] == "-"
        assert (rows[name]["requested"], rows[name]["actual"], rows[name]["reason"]) == ("int8", "int8", "")
    assert _activation(calib, True)[3] > 0  # the affine zero point really is exercised
    for name, values in outputs.items():
        lo, hi, scale, _ = _activation(values, True)
        cell = rows[name]["output"]
        assert re.fullmatch(rf"8b \[{NUMBER}, {NUMBER}\] s={NUMBER} zp=0", cell), cell
        np.testing.assert_allclose(_numbers(cell)[1:4], [lo, hi, scale], rtol=1e-3, atol=1e-6)
        assert rows[name]["weight"] == rows[name]["input"] == "-"
    fc2 = rows["fc2"]
    assert (fc2["weight"], fc2["input"], fc2["output"]) == ("16b", "-", "-")
    assert (fc2["requested"], fc2["actual"]) == ("fp16", "fp32") and "fp16" in fc2["reason"]


def test_bench_engine(saved, capsys):
    folder = saved[0]
    assert main(["bench", str(folder / "mnist.mixq"), "--batch-size", "16", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.strip().splitlines()[-3:]
    assert "median ms" in header and "p90 ms" in header
    assert row.split()[:3] == ["onnxruntime", "16", "3"]


@pytest.mark.parametrize("args,fragment", [
    (["inspect", "/nonexistent/file.json"], "No such file"),
    (["bench", "/nonexistent/engine.mixq", "--batch-size", "4"], "no engine file"),
    (["bench", "__CALIB__", "--batch-size", "4"], "is a mixq calibration file, not an engine"),
    (["bench", "__ENGINE__", "--batch-size", "0"], "must be positive"),
])
def test_errors_are_one_line_without_traceback(saved, tmp_path, args, fragment):
    folder = saved[0]
    args = [a.replace("__CALIB__", str(folder / "calibration.json")).replace("__ENGINE__", str(folder / "mnist.mixq"))
            for a in args]
    result = subprocess.run([sys.executable, "-m", "mixq.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_engine_file(saved, tmp_path):
    folder = saved[0]
    data = (folder / "mnist.mixq").read_bytes()
    broken = tmp_path / "broken.mixq"
    broken.write_bytes(data[: len(data) // 2])
    result = subprocess.run([sys.executable, "-m", "mixq.cli", "inspect", str(broken)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
