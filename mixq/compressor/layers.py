"""Layer geometry shared by the quantizers and the export: a weight's output-channel axis and a
BatchNorm's per-channel factor (the one place both are computed)."""
from __future__ import annotations

import torch
import torch.nn as nn


def weight_axis(module: nn.Module) -> int:
    """The output-channel axis of a layer's weight (1 for ConvTranspose, else 0)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm (differentiable:
    QAT's simulated folding trains through it)."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)
