"""Train the small CIFAR ResNet-20 checkpoint that the reconstruction and mixed-precision tests use.

    python3 benchmarks/train_cifar_resnet.py [--data ../shared/data] [--epochs 35] [--out tests/data/resnet20_cifar.pt]

Trains on whatever ``data_batch_*`` files exist (here: ``data_batch_1``, 10,000 images) with
random crop (4-pixel padding) and horizontal flips, SGD with Nesterov momentum, a one-epoch
warm-up then cosine decay. About 13 minutes on 2 CPU cores for 35 epochs. Writes the
state_dict (fp32, ~1.1 MB, loadable with ``torch.load(path, weights_only=True)``) and prints
the fp32 test accuracy on the 10,000 test images.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixq.atomic_io import atomic_write
from mixq.datasets import load_cifar10, shared_data_dir
from mixq.models import accuracy, resnet20_cifar

logger = logging.getLogger("train_cifar_resnet")
REPO = Path(__file__).resolve().parent.parent


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded batch, and a random horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
          batch_size: int = 128, lr: float = 0.1, weight_decay: float = 5e-4, seed: int = 0) -> None:
    """SGD (Nesterov, momentum 0.9) with a linear one-epoch warm-up then cosine decay to zero."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    for epoch in range(epochs):
        model.train()
        start, running = time.time(), 0.0
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            x = augment(images[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(idx)
        logger.info("epoch %d/%d  loss %.3f  %.0f s", epoch + 1, epochs, running / len(images), time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=shared_data_dir(), help="root holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=35)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "tests" / "data" / "resnet20_cifar.pt"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.data is None:
        parser.error("no CIFAR-10 found: pass --data ROOT (the folder holding cifar-10-batches-py)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load_cifar10(args.data)
    model = resnet20_cifar().to(memory_format=torch.channels_last)
    start = time.time()
    train(model, xtr, ytr, args.epochs)
    model = model.to(memory_format=torch.contiguous_format)
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buffer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, buffer.getvalue())
    print(f"ResNet-20, {len(xtr)} training images, {args.epochs} epochs, {time.time() - start:.0f} s: "
          f"fp32 test accuracy {accuracy(model, xte, yte):.2f}% on {len(xte)} images -> {args.out} "
          f"({len(buffer.getvalue()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
