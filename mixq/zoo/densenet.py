"""DenseNet (Huang et al. 2017), torchvision's DenseNet-121 layout at reduced size.

Pre-activation dense layers (BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv) that each read
``torch.cat`` of every earlier feature map in their block, transitions (BN -> ReLU -> 1x1 conv
-> 2x2 average pool), a final BN, functional ``F.relu`` + ``F.adaptive_avg_pool2d``, and a
``torch.flatten`` + ``nn.Linear`` head.

``densenet_small`` keeps the layout and shrinks it so a batch of 8 at 128x128 runs quickly on
two cores: growth rate 24 instead of 32, 48 stem channels instead of 64, and blocks of
(4, 8, 12, 8) layers instead of (6, 12, 24, 16). ``densenet121`` builds the full network
(7,978,856 parameters at 1000 classes).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseLayer(nn.Module):
    """Concatenate the block's features so far, then the BN-ReLU-Conv bottleneck, then the 3x3 conv."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: List[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, x: Union[Tensor, List[Tensor]]) -> Tensor:
        prev_features = [x] if isinstance(x, Tensor) else x
        new_features = self.conv2(self.relu2(self.norm2(self.bn_function(prev_features))))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; returns the concatenation of the input and every layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv (halving the channels) -> 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet121(num_classes: int = 1000) -> DenseNet:
    """The full DenseNet-121: growth 32, blocks (6, 12, 24, 16), 64 stem channels."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)


def densenet_small(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121's layout reduced for quick CPU runs: growth 24, blocks (4, 8, 12, 8), 48 stem channels."""
    return DenseNet(24, (4, 8, 12, 8), 48, num_classes=num_classes)
