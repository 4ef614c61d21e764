"""Small pieces the zoo's architectures share: channel rounding and torchvision-style init."""
from __future__ import annotations

import math
from typing import Optional

from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``value``
    (the rule the MobileNet/EfficientNet papers' reference code uses for width multipliers)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def init_weights(model: nn.Module, linear: str = "normal") -> None:
    """Kaiming-normal (fan_out) convs with zero biases, unit/zero norms, and a classifier init of
    ``linear``: ``'normal'`` (std 0.01, MobileNets), ``'uniform'`` (+-1/sqrt(out), EfficientNet)
    or ``'default'`` (PyTorch's own, kept as is)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
