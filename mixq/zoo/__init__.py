"""A model zoo of common CNN architectures, written without torchvision, for benchmarks and tests.

Random weights with torchvision-style initialisation; call :func:`reestimate_bn` on a few
batches of :func:`sample_images` before measuring anything range-dependent (quantization).
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
