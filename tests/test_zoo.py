"""The model zoo (mixq.zoo) and the ONNX Runtime baseline harness (benchmarks/ort_baseline.py)."""
import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixq.zoo import ZOO, calibration_batches, image_source, reestimate_bn, sample_images
from mixq.zoo.densenet import densenet121

_SPEC = importlib.util.spec_from_file_location(
    "ort_baseline", Path(__file__).resolve().parent.parent / "benchmarks" / "ort_baseline.py")
ob = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ob)

# torchvision's parameter counts at 1000 classes (its model cards)
REFERENCE_PARAMS = {"resnet50": 25_557_032, "mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032,
                    "efficientnet_b0": 5_288_548, "googlenet": 6_624_904}


def _export(model: nn.Module, shape=(1, 3, 128, 128)) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(*shape), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads make these forwards ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    """(calibration batches, held-out batch): 2 x 4 and 4 images at 128x128, disjoint."""
    return calibration_batches(2, 4), sample_images(4, offset=5000)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(name):
    n = sum(p.numel() for p in ZOO[name]().parameters())
    assert abs(n / REFERENCE_PARAMS[name] - 1) < 0.02, n


def test_densenet_reduction_and_full_layout():
    assert sum(p.numel() for p in densenet121().parameters()) == 7_978_856
    small = sum(p.numel() for p in ZOO["densenet_small"]().parameters())
    assert 1e6 < small < 4e6


def test_code_patterns_are_the_reference_ones():
    """The patterns that break naive module->node mappings are really there."""
    resnet = ZOO["resnet50"]()
    block = resnet.layer1[0]
    assert isinstance(resnet.layer1, nn.Sequential) and isinstance(block.relu, nn.ReLU) and block.relu.inplace
    assert sum(isinstance(m, nn.ReLU) for m in block.modules()) == 1  # one ReLU module, called three times
    calls = []
    handle = block.relu.register_forward_hook(lambda *a: calls.append(1))
    block.eval()(torch.randn(1, 64, 8, 8))
    handle.remove()
    assert len(calls) == 3
    v2 = ZOO["mobilenet_v2"]()
    assert any(isinstance(m, nn.ReLU6) for m in v2.modules()) and isinstance(v2.classifier[0], nn.Dropout)
    v3 = ZOO["mobilenet_v3_large"]()
    assert any(isinstance(m, nn.Hardswish) for m in v3.modules())
    b0 = ZOO["efficientnet_b0"]()
    assert any(isinstance(m, nn.SiLU) for m in b0.modules()) and any(isinstance(m, nn.Sigmoid) for m in b0.modules())


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_bn_reestimation_and_onnx_export(name, images):
    calib, held_out = images
    torch.manual_seed(0)
    model = reestimate_bn(ZOO[name](num_classes=1000), calib)
    assert not model.training
    with torch.no_grad():
        out = model(held_out[:2])
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    # sane scale after re-estimation: neither exploded nor vanished, and image-dependent
    assert 1e-3 < out.std().item() < 50 and (out[0] - out[1]).abs().max() > 1e-4
    onnx_out = ob.run_onnx(_export(model), held_out[:2].numpy())[0]
    np.testing.assert_allclose(onnx_out, out.numpy(), rtol=1e-3, atol=1e-4 * max(1.0, out.abs().max().item()))


def test_reestimate_bn_is_the_plain_average_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5))
    batches = [torch.randn(2, 3, 8, 8) + i for i in range(3)]
    reestimate_bn(model, batches)
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.3 and not bn.training and int(bn.num_batches_tracked) == 3
    with pytest.raises(ValueError):
        reestimate_bn(model, [])


@pytest.mark.parametrize("source", ["auto", "synthetic"])
def test_images_are_deterministic_and_normalised(source):
    x = sample_images(6, size=64, source=source)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, sample_images(6, size=64, source=source), rtol=0, atol=0)
    torch.testing.assert_close(x[3:], sample_images(3, size=64, offset=3, source=source), rtol=0, atol=0)
    assert abs(x.mean().item()) < 1.0 and 0.4 < x.std().item() < 2.0
    assert x.amin() >= -2.2 and x.amax() <= 2.7  # inside ImageNet-normalised [0, 1]
    # natural-image-like: neighbouring pixels are strongly correlated
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


def test_image_source_names_a_missing_dataset(monkeypatch):
    import mixq.zoo.images as images_mod

    monkeypatch.setattr(images_mod, "_cifar_test_file", lambda: None)
    assert image_source() == "synthetic"
    with pytest.raises(FileNotFoundError, match="synthetic"):
        image_source("cifar")


def test_mac_count_matches_the_torch_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    fp32 = _export(model, (2, 3, 16, 16))
    expected = 2 * (8 * 8 * 8 * 3 * 9 + 8 * 8 * 8 * 2 * 9 + 8 * 5)
    assert sum(ob.mac_count(fp32, input_shapes={"input": (2, 3, 16, 16)}).values()) == expected
    assert sum(ob.mac_count(fp32, feeds=np.zeros((2, 3, 16, 16), np.float32)).values()) == expected


def test_quantize_static_baseline_is_integer_and_close_to_fp32(images):
    """ORT's own quantize_static (QDQ, u8 activations, per-channel s8 weights) on a zoo model."""
    calib, held_out = images
    torch.manual_seed(0)
    model = reestimate_bn(ZOO["googlenet"](), calib)
    fp32 = _export(model)
    int8 = ob.ort_quantize_static(fp32, [b.numpy() for b in calib])
    ops = {n.op_type for n in ob.as_proto(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with torch.no_grad():
        ref = model(held_out).numpy()
    assert ob.cosine(ob.run_onnx(int8, held_out.numpy())[0], ref) > 0.9
    summary = ob.kernel_summary(int8, held_out[:1].numpy())
    assert "QLinearConv" in summary["ops"] and summary["integer_share"] > 0.95
    assert summary["total_macs"] == sum(ob.mac_count(fp32, input_shapes={"input": (1, 3, 128, 128)}).values())


def test_quantize_dynamic_and_subprocess_timing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(2, 16), buf, dynamo=False, input_names=["x"])
    dyn = ob.ort_quantize_dynamic(buf.getvalue())
    x = np.random.default_rng(0).standard_normal((2, 16), dtype=np.float32)
    assert ob.cosine(ob.run_onnx(dyn, x)[0], model(torch.from_numpy(x)).detach().numpy()) > 0.99
    assert ob.kernel_summary(dyn, x)["integer_share"] == 1.0
    best = ob.time_round_robin({"fp32": buf.getvalue(), "dynamic": dyn}, x, rounds=1, runs=3, warmup=1,
                               min_seconds=0.01)
    assert set(best) == {"fp32", "dynamic"} and all(0 < t < 1 for t in best.values())
