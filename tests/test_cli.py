"""The mixq console script on a calibration file and a saved engine, and its error paths."""
import subprocess
import sys

import pytest
import torch

from mixq.cli import main
from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup

CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
          {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mnist):
    (xtr, _), _ = mnist
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = MnistNet().eval()
    quantizer = ObserverQuantizer(model, CONFIG)
    with torch.no_grad():
        model(xtr[:256])
    quantizer.compress()
    calibration = quantizer.export_model(None, str(folder / "calibration.json"))
    engine = ModelSpeedup(model, (1, 1, 28, 28), config=calibration, backend="onnxruntime", batchsize=32)
    engine.compress()
    engine.export_quantized_model(str(folder / "mnist.mixq"))
    return folder, calibration


def test_inspect_calibration(saved, capsys):
    folder, calibration = saved
    assert main(["inspect", str(folder / "calibration.json")]) == 0
    out = capsys.readouterr().out
    for layer in calibration:
        assert layer in out
    scale = calibration["conv2"]["tracked_max_input"] / 127
    assert f"s={scale:.4g}" in out  # the derived input scale is shown


def test_inspect_engine_shows_requested_and_actual(saved, capsys):
    folder, _ = saved
    assert main(["inspect", str(folder / "mnist.mixq")]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out
    conv_line = next(line for line in out.splitlines() if line.startswith("conv1 "))
    assert conv_line.split()[-2:] == ["int8", "int8"]


def test_bench_engine(saved, capsys):
    folder, _ = saved
    assert main(["bench", str(folder / "mnist.mixq"), "--batch-size", "16", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.strip().splitlines()[-3:]
    assert "median ms" in header and "p90 ms" in header
    assert row.split()[:3] == ["onnxruntime", "16", "3"]


@pytest.mark.parametrize("args,fragment", [
    (["inspect", "/nonexistent/file.json"], "No such file"),
    (["bench", "/nonexistent/engine.mixq", "--batch-size", "4"], "no engine file"),
    (["bench", "__CALIB__", "--batch-size", "4"], "not a readable mixq engine file"),
    (["bench", "__ENGINE__", "--batch-size", "0"], "must be positive"),
])
def test_errors_are_one_line_without_traceback(saved, tmp_path, args, fragment):
    folder, _ = saved
    args = [a.replace("__CALIB__", str(folder / "calibration.json")).replace("__ENGINE__", str(folder / "mnist.mixq"))
            for a in args]
    result = subprocess.run([sys.executable, "-m", "mixq.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_engine_file(saved, tmp_path):
    folder, _ = saved
    data = (folder / "mnist.mixq").read_bytes()
    broken = tmp_path / "broken.mixq"
    broken.write_bytes(data[: len(data) // 2])
    result = subprocess.run([sys.executable, "-m", "mixq.cli", "inspect", str(broken)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
