"""OpenVINO's placement on a torchvision-layout ResNet (issue #16): the max-pool keeps its input's
u8 grid and an Add of two convs (a projection shortcut) has its second input quantized, so every
convolution but the last writes u8, as with ONNX Runtime's Q/DQ positions, while the simulation
still follows the placement (TensorRT's placement is not changed by these rules)."""
from __future__ import annotations

import copy

import pytest
import torch

from mixq.compressor.calibration import TENSORS_KEY
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.zoo import calibration_batches, reestimate_bn, sample_images
from mixq.zoo.resnet import ResNet

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
SIZE = 32


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = ResNet((1, 1, 1, 1), num_classes=10).eval()
    calib = calibration_batches(4, 8, SIZE)
    reestimate_bn(model, calib)
    return model, calib


def calibrated(model, calib, backend):
    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, NATURAL, backend=backend)
    with torch.no_grad():
        for batch in calib:
            wrapped(batch)
    quantizer.compress()
    return wrapped, quantizer.calibration_config()


def test_maxpool_input_and_projection_shortcut_are_points_on_openvino_only(resnet):
    model, calib = resnet
    shortcuts = {f"layer{i}.0.downsample.1@0" for i in range(1, 5)}
    _, ov_config = calibrated(model, calib, "openvino")
    ov_points = set(ov_config[TENSORS_KEY])
    assert "relu@0" in ov_points and "maxpool@0" not in ov_points  # the pool's output keeps its input's grid
    assert shortcuts <= ov_points
    _, trt_config = calibrated(model, calib, "tensorrt")
    trt_points = set(trt_config[TENSORS_KEY])
    assert "maxpool@0" in trt_points and "relu@0" not in trt_points
    assert not shortcuts & trt_points


def test_every_conv_but_the_last_writes_u8_and_engine_follows_simulation(resnet):
    pytest.importorskip("openvino", reason='the OpenVINO backend needs `pip install "mixq[openvino]"`')
    model, calib = resnet
    wrapped, config = calibrated(model, calib, "openvino")
    engine = ModelSpeedup(model, (8, 3, SIZE, SIZE), config=config, backend="openvino", num_threads=2).compress()
    layers = []
    for op in engine._engine.runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        layers.append(tuple(info[k].astype(str) for k in ("layerType", "runtimePrecision", "outputPrecisions")))
    assert ("Pooling", "u8", "u8") in layers  # the max-pool runs on the codes
    convs = [layer for layer in layers if layer[0] == "Convolution"]
    assert len(convs) == 17 and all(precision == "u8" for _, precision, _ in convs)
    assert [out for _, _, out in convs].count("f32") == 1  # only the conv before global average pooling
    images = sample_images(64, SIZE, offset=5000)
    with torch.no_grad():
        simulated = wrapped(images)
    out = engine.inference(images)[0]
    assert torch.nn.functional.cosine_similarity(out.flatten(), simulated.flatten(), 0).item() > 0.999
