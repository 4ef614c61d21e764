"""EfficientNet-B0 (Tan & Le 2019), torchvision's layout: MBConv blocks with ``nn.SiLU``,
squeeze-excitation as modules (``AdaptiveAvgPool2d`` -> 1x1 conv -> ``SiLU`` -> 1x1 conv ->
``nn.Sigmoid``, then ``scale * input``), the residual added in place (``result += input``)
after stochastic depth (identity at eval), ``Dropout(0.2)`` + ``nn.Linear`` head.
5,288,548 parameters at 1000 classes.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
from torch import Tensor, nn

from .common import init_weights


class StageConfig(NamedTuple):
    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    num_layers: int


B0_SETTING = [StageConfig(1, 3, 1, 32, 16, 1), StageConfig(6, 3, 2, 16, 24, 2), StageConfig(6, 5, 2, 24, 40, 2),
              StageConfig(6, 3, 2, 40, 80, 3), StageConfig(6, 5, 1, 80, 112, 3), StageConfig(6, 5, 2, 112, 192, 4),
              StageConfig(6, 3, 1, 192, 320, 1)]


class Conv2dNormActivation(nn.Sequential):
    """Conv2d (same padding, no bias) -> BatchNorm2d -> SiLU (or no activation)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: bool = True) -> None:
        layers: List[nn.Module] = [nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2,
                                             groups=groups, bias=False), nn.BatchNorm2d(out_planes)]
        if activation:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate with modules: average pool -> fc1 -> SiLU -> fc2 -> Sigmoid, times the input."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class StochasticDepth(nn.Module):
    """Drops whole residual branches per sample with probability ``p`` in training; identity at eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * noise.div_(keep)


class MBConv(nn.Module):
    """1x1 expand -> kxk depthwise -> SE -> 1x1 linear projection, plus the input when shapes match."""

    def __init__(self, cnf: StageConfig, in_channels: int, stride: int, sd_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == cnf.out_channels
        expanded = in_channels * cnf.expand_ratio
        layers: List[nn.Module] = []
        if expanded != in_channels:
            layers.append(Conv2dNormActivation(in_channels, expanded, kernel_size=1))
        layers.append(Conv2dNormActivation(expanded, expanded, cnf.kernel, stride, groups=expanded))
        layers.append(SqueezeExcitation(expanded, max(1, in_channels // 4)))
        layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, activation=False))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.out_channels = cnf.out_channels

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    def __init__(self, setting: List[StageConfig] = B0_SETTING, num_classes: int = 1000, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2, last_channel: int = 1280) -> None:
        super().__init__()
        layers: List[nn.Module] = [Conv2dNormActivation(3, setting[0].in_channels, stride=2)]
        total = sum(c.num_layers for c in setting)
        block_id = 0
        for cnf in setting:
            stage: List[nn.Module] = []
            for i in range(cnf.num_layers):
                in_channels = cnf.in_channels if i == 0 else cnf.out_channels
                stride = cnf.stride if i == 0 else 1
                stage.append(MBConv(cnf, in_channels, stride, stochastic_depth_prob * block_id / total))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        layers.append(Conv2dNormActivation(setting[-1].out_channels, last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))
        init_weights(self, linear="uniform")

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0 (width and depth multipliers 1.0)."""
    return EfficientNet(B0_SETTING, num_classes)
