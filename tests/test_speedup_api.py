"""ModelSpeedup public API: batching, several inputs/outputs, validation, save/load, config handling."""
from __future__ import annotations

import copy
import importlib.util
import json
import zipfile

import pytest
import torch
import torch.nn as nn

from mixq.compressor import save_calibration_config
from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import BackendUnavailable, EngineFormatError, ModelSpeedup, ModelSpeedupTensorRT
from mixq.speedup.backends import get_backend, resolve_backend_name
from mixq.speedup.precision_report import layer_rows

CONFIG_LIST = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
               {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]}]


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Conv1d(2, 3, 3)

    def forward(self, x, y):
        return self.a(x).relu(), self.b(y).flatten(1)


@pytest.fixture(scope="module")
def small_mnist():
    torch.manual_seed(0)
    return MnistNet().eval(), torch.randn(200, 1, 28, 28)


@pytest.fixture(scope="module")
def int8_engine(small_mnist):
    model, x = small_mnist
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, CONFIG_LIST)
    with torch.no_grad():
        wrapped(x)
    quantizer.compress()
    engine = ModelSpeedup(wrapped, (32, 1, 28, 28), config=quantizer.calibration_config(), num_threads=2)
    engine.compress()
    return engine, wrapped, quantizer


def test_any_batch_size_is_chunked(int8_engine, small_mnist):
    engine, wrapped, _ = int8_engine
    _, x = small_mnist
    full, _ = engine.inference(x[:100])  # 100 > batchsize 32: four chunks
    for n in (1, 7, 32, 33):
        part, latency = engine.inference(x[:n])
        assert part.shape == (n, 10) and latency > 0
        torch.testing.assert_close(part, full[:n])


def test_wrapped_model_is_left_working(int8_engine, small_mnist):
    _, wrapped, quantizer = int8_engine
    _, x = small_mnist
    assert set(quantizer.modules_wrapper) <= {n for n, _ in wrapped.named_modules()}
    with torch.no_grad():
        before = wrapped(x[:8])
    assert torch.equal(before, wrapped(x[:8]).detach())


def test_user_model_is_not_modified(small_mnist):
    model, x = small_mnist
    state = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    engine = ModelSpeedup(model, (16, 1, 28, 28), extra_layer_bits=8, calib_data_loader=[(x[:64], None)],
                          num_threads=2)
    engine.compress()
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {r["actual"] for r in layer_rows(engine.precision_report())} == {"int8"}


def test_several_inputs_and_outputs():
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    x, y = torch.randn(10, 6), torch.randn(10, 2, 8)
    engine = ModelSpeedup(model, [(4, 6), (4, 2, 8)], num_threads=2)
    engine.compress()
    (a, b), _ = engine.inference((x, y))
    with torch.no_grad():
        ea, eb = model(x, y)
    torch.testing.assert_close(a, ea, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, eb, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different batch sizes"):
        engine.inference((x, y[:3]))
    with pytest.raises(ValueError, match="takes 2 input"):
        engine.inference(x)


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.double(), "dtype torch.float64.*x.float()"),
    (lambda x: x[0], r"rank 3.*\('N', 1, 28, 28\)"),
    (lambda x: x[:, :, :27], "shape"),
    (lambda x: x[:0], "batch size 0"),
    (lambda x: torch.where(x > 2, float("nan"), x), "NaN"),
    (lambda x: torch.where(x > 2, float("inf"), x), "infinity"),
    (lambda x: (x, x), "takes 1 input"),
])
def test_bad_inputs_are_clear_errors(int8_engine, small_mnist, bad, message):
    engine, _, _ = int8_engine
    _, x = small_mnist
    with pytest.raises(ValueError, match=message):
        engine.inference(bad(x[:4]))


def test_save_load_round_trip(int8_engine, small_mnist, tmp_path):
    engine, _, _ = int8_engine
    _, x = small_mnist
    path = tmp_path / "engine.mixq"
    engine.export_quantized_model(str(path))
    loaded = ModelSpeedup.load_quantized_model(str(path), num_threads=2)
    torch.testing.assert_close(loaded.inference(x[:50])[0], engine.inference(x[:50])[0], atol=0, rtol=0)
    assert loaded.precision_report() == engine.precision_report()
    meta = json.loads(zipfile.ZipFile(path).read("meta.json"))
    assert meta["backend"] == "onnxruntime" and meta["input_shapes"] == [[32, 1, 28, 28]]
    assert set(meta["layer_nodes"]) == {r["layer"] for r in layer_rows(engine.precision_report())}
    with pytest.raises(ValueError, match="shape"):
        loaded.inference(x[:, :, :20])


def _rewrite_meta(src, dst, **changes):
    with zipfile.ZipFile(src) as zf:
        meta, payload = json.loads(zf.read("meta.json")), zf.read("payload.bin")
    meta.update(changes)
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("meta.json", json.dumps(meta))
        zf.writestr("payload.bin", payload)


def test_engine_file_errors(int8_engine, tmp_path):
    engine, _, _ = int8_engine
    good = tmp_path / "good.mixq"
    engine.export_quantized_model(str(good))
    corrupt = tmp_path / "corrupt.mixq"
    corrupt.write_bytes(good.read_bytes()[:100])
    with pytest.raises(EngineFormatError, match="corrupt"):
        ModelSpeedup.load_quantized_model(str(corrupt))
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("hello.txt", "not an engine")
    with pytest.raises(EngineFormatError, match="not a mixq engine file"):
        ModelSpeedup.load_quantized_model(str(other))
    for name, changes, message in [("version", {"format_version": 99}, "format version 99"),
                                   ("ortversion", {"backend_version": "0.1"}, "built with onnxruntime 0.1"),
                                   ("backend", {"backend": "tensorrt"}, None)]:
        path = tmp_path / f"{name}.mixq"
        _rewrite_meta(good, path, **changes)
        with pytest.raises((EngineFormatError, BackendUnavailable), match=message):
            ModelSpeedup.load_quantized_model(str(path))
    with pytest.raises(EngineFormatError, match="holds a 'onnxruntime' engine"):
        ModelSpeedupTensorRT.load_quantized_model(str(good))
    with pytest.raises(FileNotFoundError):
        ModelSpeedup.load_quantized_model(str(tmp_path / "missing.mixq"))


def test_inference_before_compress_is_an_error(small_mnist):
    model, x = small_mnist
    with pytest.raises(RuntimeError, match="compress"):
        ModelSpeedup(model, (8, 1, 28, 28)).inference(x[:8])


def test_bits_only_config_is_calibrated_from_the_loader(small_mnist, tmp_path):
    model, x = small_mnist
    config = {"conv2": {"weight_bits": 8, "input_bits": 8}, "relu2": {"output_bits": 8},
              "fc1": {"weight_bits": 8, "input_bits": 8}, "relu3": {"output_bits": 8}}
    with pytest.raises(ValueError, match="calib_data_loader"):
        ModelSpeedup(model, (8, 1, 28, 28), config=config).compress()
    engine = ModelSpeedup(model, (8, 1, 28, 28), config=config, calib_data_loader=[x[:50], x[50:100]],
                          onnx_path=str(tmp_path / "annotated.onnx"), num_threads=2)
    engine.compress()
    report = {r["layer"]: r["actual"] for r in layer_rows(engine.precision_report())}
    assert report == {"conv2": "int8", "relu2": "int8", "fc1": "int8", "relu3": "int8"}
    import onnx
    ops = {n.op_type for n in onnx.load(str(tmp_path / "annotated.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_calibration_file_and_uniform_precisions(int8_engine, small_mnist, tmp_path):
    _, _, quantizer = int8_engine
    model, x = small_mnist
    path = tmp_path / "calibration.json"
    save_calibration_config(quantizer.calibration_config(), str(path))
    engine = ModelSpeedup(model, (8, 1, 28, 28), config=str(path), num_threads=2)
    engine.compress()
    assert {r["actual"] for r in layer_rows(engine.precision_report())} == {"int8"}
    fp16 = ModelSpeedup(model, (8, 1, 28, 28), extra_layer_bits=16, num_threads=2)
    fp16.compress()
    rows = layer_rows(fp16.precision_report())
    assert {r["layer"] for r in rows} == {"conv1", "conv2", "fc1", "fc2"}
    assert all(r["requested"] == "fp16" and r["actual"] == "fp32" and "fp16" in r["reason"] for r in rows)
    with pytest.raises(ValueError, match="close matches: conv1"):
        ModelSpeedup(model, (8, 1, 28, 28), config={"conv_1": {"output_bits": 8}}).compress()
    with pytest.raises(ValueError, match="extra_layer_bits"):
        ModelSpeedup(model, (8, 1, 28, 28), extra_layer_bits=4)


def test_backend_selection(small_mnist):
    model, _ = small_mnist
    assert resolve_backend_name("onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match="unknown backend"):
        ModelSpeedup(model, (8, 1, 28, 28), backend="coreml")
    expected = "tensorrt" if torch.cuda.is_available() and _tensorrt_installed() else (
        "openvino" if importlib.util.find_spec("openvino") else "onnxruntime")
    assert resolve_backend_name("auto") == expected
    assert get_backend("onnxruntime").name == "onnxruntime"
    if not _tensorrt_installed():
        with pytest.raises(BackendUnavailable, match=r"mixq\[tensorrt\]"):
            ModelSpeedupTensorRT(model, (8, 1, 28, 28), batchsize=8).compress()


def _tensorrt_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorrt") is not None


class ResidualAfterBN(nn.Module):
    """A BN whose output meets an Add and is then freed: the next tensor Python allocates (here
    ``y * 2``) tends to reuse its id(), which must not pass for the BN's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b = self.bn(self.conv(x))
        y = b + x
        del b  # the BN's output is freed here; y * 2 is the next tensor allocated
        return self.fc(self.relu(y * 2).mean((2, 3)))


def test_uniform_int8_calibrates_the_output_of_a_bn_feeding_an_add():
    torch.manual_seed(0)
    model, x = ResidualAfterBN().eval(), torch.randn(32, 4, 8, 8)
    engine = ModelSpeedup(model, (8, 4, 8, 8), extra_layer_bits=8, calib_data_loader=[x])
    engine.compress()
    report = {r["layer"]: r for r in engine.precision_report()}
    assert report["conv"]["actual"] == report["fc"]["actual"] == "int8", report
    assert "QLinearAdd" in engine._engine.optimized_op_types  # the BN output meeting the Add was calibrated


def test_a_config_list_where_a_calibration_is_expected_says_so(small_mnist):
    model, _ = small_mnist
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d"]}]
    with pytest.raises(TypeError, match="got a config list: calibrate the config list with a quantizer first"):
        ModelSpeedup(model, (8, 1, 28, 28), config=config_list)


def test_sparse_and_meta_inputs_are_one_line_errors(int8_engine):
    engine, _, _ = int8_engine
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(TypeError, match="pass a dense one"):
        engine.inference(x.to_sparse())
    with pytest.raises(ValueError, match="meta device"):
        engine.inference(torch.empty(4, 1, 28, 28, device="meta"))
