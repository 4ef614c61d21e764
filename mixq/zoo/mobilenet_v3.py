"""MobileNetV3-Large (Howard et al. 2019), torchvision's layout: ``nn.Hardswish`` / ``nn.ReLU``
blocks, squeeze-excitation written with functional calls (``F.adaptive_avg_pool2d``, ``F.relu``,
``F.hardsigmoid``) and ``scale * input``, residual ``x + block(x)``, and a ``Linear -> Hardswish
-> Dropout -> Linear`` head. 5,483,032 parameters at 1000 classes.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import init_weights, make_divisible

BatchNorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class BlockConfig(NamedTuple):
    kernel: int
    expanded: int
    out: int
    use_se: bool
    activation: str  # "RE" (ReLU) or "HS" (Hardswish)
    stride: int


# input 16 channels after the stem; the Large table of the paper
LARGE_SETTING = [BlockConfig(3, 16, 16, False, "RE", 1), BlockConfig(3, 64, 24, False, "RE", 2),
                 BlockConfig(3, 72, 24, False, "RE", 1), BlockConfig(5, 72, 40, True, "RE", 2),
                 BlockConfig(5, 120, 40, True, "RE", 1), BlockConfig(5, 120, 40, True, "RE", 1),
                 BlockConfig(3, 240, 80, False, "HS", 2), BlockConfig(3, 200, 80, False, "HS", 1),
                 BlockConfig(3, 184, 80, False, "HS", 1), BlockConfig(3, 184, 80, False, "HS", 1),
                 BlockConfig(3, 480, 112, True, "HS", 1), BlockConfig(3, 672, 112, True, "HS", 1),
                 BlockConfig(5, 672, 160, True, "HS", 2), BlockConfig(5, 960, 160, True, "HS", 1),
                 BlockConfig(5, 960, 160, True, "HS", 1)]


class ConvBNActivation(nn.Sequential):
    """Conv2d (same padding, no bias) -> BatchNorm2d -> activation (or none)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation_layer: Callable[..., nn.Module] = nn.Hardswish) -> None:
        layers: List[nn.Module] = [nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2,
                                             groups=groups, bias=False), BatchNorm(out_planes)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate: global average -> 1x1 conv -> ReLU -> 1x1 conv -> hard sigmoid, times the input."""

    def __init__(self, input_channels: int, squeeze_factor: int = 4) -> None:
        super().__init__()
        squeeze_channels = make_divisible(input_channels // squeeze_factor, 8)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)

    def _scale(self, x: Tensor, inplace: bool) -> Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.relu(self.fc1(scale), inplace=True)
        return F.hardsigmoid(self.fc2(scale), inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        return self._scale(x, True) * x


class InvertedResidual(nn.Module):
    """1x1 expand -> kxk depthwise -> [SE] -> 1x1 linear projection, plus the input when shapes match."""

    def __init__(self, in_channels: int, cnf: BlockConfig) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and in_channels == cnf.out
        act = nn.Hardswish if cnf.activation == "HS" else nn.ReLU
        layers: List[nn.Module] = []
        if cnf.expanded != in_channels:
            layers.append(ConvBNActivation(in_channels, cnf.expanded, kernel_size=1, activation_layer=act))
        layers.append(ConvBNActivation(cnf.expanded, cnf.expanded, cnf.kernel, cnf.stride, groups=cnf.expanded,
                                       activation_layer=act))
        if cnf.use_se:
            layers.append(SqueezeExcitation(cnf.expanded))
        layers.append(ConvBNActivation(cnf.expanded, cnf.out, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = result + x
        return result


class MobileNetV3(nn.Module):
    def __init__(self, setting: List[BlockConfig] = LARGE_SETTING, last_channel: int = 1280,
                 num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        channels = 16  # the stem's width in both MobileNetV3 tables
        layers: List[nn.Module] = [ConvBNActivation(3, channels, stride=2, activation_layer=nn.Hardswish)]
        for cnf in setting:
            layers.append(InvertedResidual(channels, cnf))
            channels = cnf.out
        last_conv = 6 * channels
        layers.append(ConvBNActivation(channels, last_conv, kernel_size=1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))
        init_weights(self, linear="normal")

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large at width 1.0."""
    return MobileNetV3(LARGE_SETTING, 1280, num_classes)
