"""The OpenVINO backend (issue #16) on this machine's CPU: simulation equals deployment on real
MNIST images, the report reads what OpenVINO compiled, engine files, threads, dynamic batch.
Skipped, saying why, without the ``openvino`` package."""
from __future__ import annotations

import copy
import sys
import zipfile

import pytest
import torch

ov = pytest.importorskip("openvino", reason='the OpenVINO backend needs `pip install "mixq[openvino]"`')

from mixq.quantizers import ObserverQuantizer  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.backends import BackendUnavailable, EngineFormatError, get_backend  # noqa: E402
from mixq.speedup.precision_report import layer_rows  # noqa: E402

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
SHAPE = (128, 1, 28, 28)


def calibrated(model, config_list, images, backend):
    """The wrapped model (the simulation) and its calibration config."""
    wrapped = copy.deepcopy(model).eval()
    quantizer = ObserverQuantizer(wrapped, config_list, backend=backend)
    with torch.no_grad():
        for i in range(0, len(images), 128):
            wrapped(images[i:i + 128])
    quantizer.compress()
    return wrapped, quantizer.calibration_config()


@pytest.fixture(scope="module")
def mnist_engines(_trained_mnist, mnist):
    model, _ = _trained_mnist
    model = copy.deepcopy(model).eval()
    (xtr, _), _ = mnist
    wrapped, config = calibrated(model, NATURAL, xtr[:512], "openvino")
    engine = ModelSpeedup(model, SHAPE, config=config, backend="openvino", num_threads=2).compress()
    _, ort_config = calibrated(model, NATURAL, xtr[:512], "onnxruntime")
    ort_engine = ModelSpeedup(model, SHAPE, config=ort_config, num_threads=2).compress()
    return model, wrapped, engine, ort_engine


def runtime_layers(engine: ModelSpeedup):
    """(layer type, runtime precision) of every node of the model OpenVINO compiled."""
    found = []
    for op in engine._engine.runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        found.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str)))
    return found


def test_engine_agrees_with_simulation_and_accuracy_with_onnx_runtime(mnist_engines, mnist):
    _, wrapped, engine, ort_engine = mnist_engines
    _, (xte, yte) = mnist
    with torch.no_grad():
        simulated = wrapped(xte).argmax(1)
    out = engine.inference(xte)[0].argmax(1)
    assert (out == simulated).float().mean().item() >= 0.995
    accuracy = (out == yte).float().mean().item()
    ort_accuracy = (ort_engine.inference(xte)[0].argmax(1) == yte).float().mean().item()
    assert abs(accuracy - ort_accuracy) <= 0.001 + 1 / len(yte)  # one image of 2,000 beyond 0.1 point


def test_report_rows_are_what_openvino_compiled(mnist_engines):
    model, _, engine, _ = mnist_engines
    rows = layer_rows(engine.precision_report())
    assert {r["layer"] for r in rows} == {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                                   torch.nn.Linear))}
    assert all(r["actual"] == r["requested"] == "int8" for r in rows), rows
    compute = [(k, p) for k, p in runtime_layers(engine) if k in ("Convolution", "FullyConnected")]
    assert len(compute) == len(rows) and all(p in ("u8", "i8") for _, p in compute), compute
    pools = [p for k, p in runtime_layers(engine) if k == "Pooling"]
    assert pools == ["u8", "u8"]  # both max-pools (the second before a Flatten) keep their input's u8 grid


def test_a_layer_left_in_float_is_reported_and_runs_f32(_trained_mnist, mnist):
    model = copy.deepcopy(_trained_mnist[0]).eval()
    (xtr, _), _ = mnist
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1", "conv2", "fc1"]}]
    _, config = calibrated(model, config_list, xtr[:256], "openvino")
    engine = ModelSpeedup(model, SHAPE, config=config, backend="openvino", num_threads=1).compress()
    actual = {r["layer"]: r["actual"] for r in layer_rows(engine.precision_report())}
    assert actual == {"conv1": "int8", "conv2": "int8", "fc1": "int8"}
    fully_connected = [p for k, p in runtime_layers(engine) if k == "FullyConnected"]
    assert sorted(fully_connected) == ["f32", "u8"]  # fc2 (not configured) runs in float


def test_relu6_folded_into_the_quantization_after_it_is_reported_int8(_trained_mnist, mnist):
    """OpenVINO folds a Clip into the FakeQuantize that follows it: no runtime node names the
    Clip, the FakeQuantize runs inside the u8 kernel, so the ReLU6 layer ran in int8."""
    model = copy.deepcopy(_trained_mnist[0]).eval()
    (xtr, _), _ = mnist
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                   {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]}]
    _, config = calibrated(model, config_list, xtr[:256], "openvino")
    engine = ModelSpeedup(model, SHAPE, config=config, backend="openvino", num_threads=1).compress()
    actual = {r["layer"]: r["actual"] for r in layer_rows(engine.precision_report())}
    assert actual == {name: "int8" for name in ("conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3")}
    kinds = {k for k, _ in runtime_layers(engine)}
    assert "Clamp" not in kinds and not any("Clip" in k for k in kinds)  # no runtime node computes the ReLU6


def test_threads_and_dynamic_batch(mnist_engines, mnist):
    _, wrapped, engine, _ = mnist_engines
    assert engine._engine.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert engine._engine.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    _, (xte, _) = mnist
    whole = engine.inference(xte[:300])[0]  # three chunks of 128, 128 and 44
    single = torch.cat([engine.inference(xte[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(single, whole[:5], rtol=1e-5, atol=1e-5)


def test_saved_engine_round_trip_and_damage(mnist_engines, mnist, tmp_path):
    _, _, engine, _ = mnist_engines
    _, (xte, _) = mnist
    path = tmp_path / "mnist.mixq"
    engine.export_quantized_model(str(path))
    loaded = ModelSpeedup.load_quantized_model(str(path), num_threads=1)
    assert loaded.backend_name == "openvino"
    assert loaded.precision_report() == engine.precision_report()
    torch.testing.assert_close(loaded.inference(xte[:200])[0], engine.inference(xte[:200])[0])
    damaged = tmp_path / "damaged.mixq"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data if item.filename == "meta.json" else data[: len(data) // 2])
    with pytest.raises(EngineFormatError, match="damaged.mixq"):
        ModelSpeedup.load_quantized_model(str(damaged))


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets without the package
    with pytest.raises(BackendUnavailable, match=r'pip install "mixq\[openvino\]"'):
        get_backend("openvino").check_available()


def test_openvino_placement_is_refused_by_another_backend(mnist_engines, mnist):
    model, _, _, _ = mnist_engines
    (xtr, _), _ = mnist
    _, config = calibrated(model, NATURAL, xtr[:128], "openvino")
    with pytest.raises(ValueError, match="backend='onnxruntime'"):
        ModelSpeedup(model, SHAPE, config=config, backend="onnxruntime").compress()


@pytest.mark.slow
def test_cifar_resnet20_engine_agrees_with_simulation(cifar_root):
    """The placement matters here: with ONNX Runtime's (a Q after every conv) OpenVINO fused the
    residual Add into the conv without that rounding and 1.5% of the predictions differed."""
    from pathlib import Path

    from mixq.datasets import load_cifar10
    from mixq.models import resnet20_cifar

    (xtr, _), (xte, yte) = load_cifar10(cifar_root)
    model = resnet20_cifar().eval()
    model.load_state_dict(torch.load(Path(__file__).parent / "data" / "resnet20_cifar.pt", weights_only=True))
    wrapped, config = calibrated(model, NATURAL, xtr[:512], "openvino")
    engine = ModelSpeedup(model, (128, 3, 32, 32), config=config, backend="openvino", num_threads=2).compress()
    assert all(r["actual"] == "int8" for r in layer_rows(engine.precision_report()))
    with torch.no_grad():
        simulated = torch.cat([wrapped(xte[i:i + 500]) for i in range(0, 5000, 500)]).argmax(1)
    out = engine.inference(xte[:5000])[0].argmax(1)
    assert (out == simulated).float().mean().item() >= 0.995
