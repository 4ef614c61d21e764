"""Reference models used by the examples, tests and benchmarks."""
from __future__ import annotations

from typing import List, Type

import torch
import torch.nn as nn
import torch.nn.functional as F


class MnistNet(nn.Module):
    """The model of NNI's MNIST quantization/speedup examples (28x28 grey input, 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.relu1 = nn.ReLU6()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.relu2 = nn.ReLU6()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.relu3 = nn.ReLU6()
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, global average pool, one fc."""

    def __init__(self, blocks: List[int], widths: List[int], num_classes: int = 10,
                 block: Type[BasicBlock] = BasicBlock) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        for i, (n, w) in enumerate(zip(blocks, widths)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, 1 if i == 0 else 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_stages = len(blocks)

    def _make_layer(self, block: Type[BasicBlock], planes: int, n: int, stride: int) -> nn.Sequential:
        mods = []
        for s in [stride] + [1] * (n - 1):
            mods.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18_cifar(num_classes: int = 10) -> CifarResNet:
    """The standard CIFAR ResNet-18 (11M parameters, 0.56 GMAC per 32x32 image)."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes)


def resnet20_cifar(num_classes: int = 10) -> CifarResNet:
    """The small CIFAR ResNet-20 of He et al. (0.27M parameters)."""
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode, no grad) on a tensor data set."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def train_epochs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 1,
                 batch_size: int = 64, lr: float = 0.01, optimizer: torch.optim.Optimizer = None,
                 seed: int = 0, progress: bool = False) -> torch.optim.Optimizer:
    """Plain SGD (momentum 0.9) training on tensors; returns the optimizer it used."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = range(epochs)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="train", unit="epoch")
    for _ in steps:
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            optimizer.step()
    return optimizer
