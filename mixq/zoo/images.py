"""Deterministic, offline, realistic-looking images for the zoo: 3 x size x size, ImageNet-normalised.

Source ``'cifar'``: CIFAR-10 test images (``cifar-10-batches-py/test_batch`` under
:func:`mixq.datasets.shared_data_dir`, i.e. ``$MIXQ_DATA`` or ``../shared/data``), taken in file
order from ``offset`` and upsampled bilinearly from 32x32. Source ``'synthetic'``, used when
CIFAR-10 is absent (a fresh clone): smooth random fields, a sum of bicubically upsampled noise
octaves (4..32 cells, amplitude halving per octave) squashed into [0, 1], with correlated
colour channels. Natural-image-like in spatial correlation and range, not in content; one
image's pixels depend only on ``seed`` and its index, so slices are consistent.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from mixq.datasets import CIFAR_MEAN, CIFAR_STD, _read_cifar_batch, cifar_dir, shared_data_dir

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cifar_test_file() -> Optional[Path]:
    root = shared_data_dir()
    if root is None:
        return None
    path = cifar_dir(root) / "test_batch"
    return path if path.exists() else None


@functools.lru_cache(maxsize=1)
def _cifar_pixels(path: str) -> torch.Tensor:
    """The 10,000 test images as uint8 (N, 3, 32, 32) (undoing mixq.datasets' normalisation)."""
    x, _ = _read_cifar_batch(Path(path))
    x = x * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def _synthetic(n: int, offset: int, seed: int) -> torch.Tensor:
    """``n`` smooth random fields in [0, 1] at 32x32, (n, 3, 32, 32)."""
    images = []
    for index in range(offset, offset + n):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        field = torch.zeros(1, 3, 32, 32)
        for cells, amplitude in ((4, 1.0), (8, 0.5), (16, 0.25), (32, 0.125)):
            luma = torch.randn(1, 1, cells, cells, generator=gen)
            colour = 0.5 * torch.randn(1, 3, cells, cells, generator=gen)
            field += amplitude * F.interpolate(luma + colour, size=(32, 32), mode="bicubic", align_corners=False)
        field += 0.5 * torch.randn(1, 3, 1, 1, generator=gen)  # per-image colour cast
        images.append(torch.sigmoid(1.5 * field))
    return torch.cat(images)


def image_source(source: str = "auto") -> str:
    """Which source ``source`` resolves to here: ``'cifar'`` or ``'synthetic'``."""
    if source not in ("auto", "cifar", "synthetic"):
        raise ValueError(f"source must be 'auto', 'cifar' or 'synthetic', not {source!r}")
    if source == "auto":
        return "cifar" if _cifar_test_file() is not None else "synthetic"
    if source == "cifar" and _cifar_test_file() is None:
        raise FileNotFoundError("CIFAR-10 test_batch not found under $MIXQ_DATA or ../shared/data "
                                "(cifar-10-batches-py); use source='synthetic'")
    return source


def sample_images(n: int, size: int = 128, offset: int = 0, source: str = "auto", seed: int = 0) -> torch.Tensor:
    """``n`` images (n, 3, size, size), float32, normalised with the ImageNet mean and std."""
    kind = image_source(source)
    if kind == "cifar":
        pixels = _cifar_pixels(str(_cifar_test_file()))
        if offset + n > len(pixels):
            raise ValueError(f"CIFAR-10 test set has {len(pixels)} images; asked for {offset}..{offset + n}")
        x = pixels[offset:offset + n].float() / 255.0
    else:
        logger.info("CIFAR-10 not found: using synthetic smooth random fields")
        x = _synthetic(n, offset, seed)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def calibration_batches(num_batches: int = 4, batch_size: int = 8, size: int = 128, offset: int = 0,
                        source: str = "auto") -> List[torch.Tensor]:
    """``num_batches`` consecutive batches of :func:`sample_images`, starting at image ``offset``."""
    x = sample_images(num_batches * batch_size, size, offset, source)
    return list(x.split(batch_size))
