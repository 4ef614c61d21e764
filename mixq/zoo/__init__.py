"""A model zoo of common CNN architectures, written without torchvision, for benchmarks and tests.

Random weights with torchvision-style initialisation; call :func:`reestimate_bn` on a few
batches of :func:`sample_images` before measuring anything range-dependent (quantization).
Parameter counts equal torchvision's at 1000 classes (``densenet_small`` is a documented
reduction of DenseNet-121).

Known behaviour of random weights, unlike trained ones: in eval mode a random BatchNorm
network amplifies an image's deviation from the average image layer after layer, so with
unbounded activations a few images have outputs far larger than typical (per-image logit std,
max over median, 128 CIFAR images: ResNet-50 ~50x, MobileNetV3 ~180x, EfficientNet-B0 ~1000x;
MobileNetV2, whose ReLU6 clips, ~2x). Such images dominate MinMax ranges and any cosine taken
over a flattened batch; compare quantized against fp32 per image (median) as well. Random
networks are also sensitive: input noise of one uint8 step already moves MobileNetV2's top-1
on most images, so top-1 agreement between a zoo model and its int8 engine means little.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .bn_stats import reestimate_bn
from .densenet import densenet121, densenet_small
from .efficientnet import efficientnet_b0
from .images import calibration_batches, image_source, sample_images
from .inception import googlenet, inception_small
from .mobilenet_v2 import mobilenet_v2
from .mobilenet_v3 import mobilenet_v3_large
from .resnet import resnet50

ZOO: Dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    "densenet_small": densenet_small,
    "googlenet": googlenet,
}

__all__ = ["ZOO", "reestimate_bn", "sample_images", "calibration_batches", "image_source", "resnet50",
           "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet_small", "densenet121",
           "googlenet", "inception_small"]
