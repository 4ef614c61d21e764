"""Offline readers for the MNIST and CIFAR-10 files in their standard (torchvision) layouts.

``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` and
``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``. The official MNIST test set is
vendored in the package (``mixq/data``) so that tests and the MNIST example run with
no network: :func:`load_mnist` falls back to it, splitting it 8,000 train / 2,000 test.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

VENDORED_DATA = Path(__file__).resolve().parent / "data"  # package data: there in every install
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
Split = Tuple[torch.Tensor, torch.Tensor]


class DatasetNotFound(FileNotFoundError):
    """The data set files are not where they were looked for."""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path} is not an IDX uint8 file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(raw: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (raw / name).exists():
            return raw / name
    return None


def _mnist_tensors(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MNIST_MEAN) / MNIST_STD, torch.from_numpy(labels.astype(np.int64))


def read_mnist_split(root: str, split: str) -> Split:
    """Normalised images (N,1,28,28) and labels of ``split`` ('train' or 't10k') under ``root``."""
    raw = Path(root) / "MNIST" / "raw"
    img, lab = _find_idx(raw, f"{split}-images-idx3-ubyte"), _find_idx(raw, f"{split}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise DatasetNotFound(f"no MNIST {split} files under {raw}")
    return _mnist_tensors(_read_idx(img), _read_idx(lab))


MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def download_mnist(root: str, timeout: float = 10.0) -> bool:
    """Fetch the four MNIST files into ``root/MNIST/raw``; False (and nothing half-written) on failure."""
    import urllib.request

    from .atomic_io import atomic_write
    raw = Path(root) / "MNIST" / "raw"
    try:
        for name in MNIST_FILES:
            if not (raw / name).exists():
                with urllib.request.urlopen(MNIST_MIRROR + name, timeout=timeout) as response:
                    atomic_write(raw / name, response.read())
    except OSError as exc:
        logger.warning("MNIST download failed (%s)", exc)
        return False
    return True


def load_mnist(root: Optional[str] = None, n_train: int = 8000) -> Tuple[Split, Split, str]:
    """(train, test, source) for MNIST.

    Uses the official train/test files under ``root`` when both exist; with only the test
    set (or nothing, in which case the vendored copy is used) the 10,000 test images are split
    into the first ``n_train`` for training and the last ``10000 - n_train`` for testing.
    """
    if root is not None:
        try:
            return read_mnist_split(root, "train"), read_mnist_split(root, "t10k"), f"{root} (train/t10k)"
        except DatasetNotFound:
            pass
    source = root
    try:
        if root is None:
            raise DatasetNotFound("no data dir given")
        x, y = read_mnist_split(root, "t10k")
    except DatasetNotFound:
        logger.info("MNIST not found under %s; using the official test set vendored in %s", root, VENDORED_DATA)
        x, y = read_mnist_split(str(VENDORED_DATA), "t10k")
        source = str(VENDORED_DATA)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), f"{source} (t10k split {n_train}/{len(x) - n_train})"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: numpy arrays and builtins only, nothing executable."""

    _ALLOWED = {(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}; only numpy arrays are allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Split:
    with open(path, "rb") as fh:
        batch = _ArrayUnpickler(fh, encoding="bytes").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    x = torch.from_numpy(data.astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(batch["labels"], dtype=torch.int64)


def cifar_dir(root: str) -> Path:
    """The ``cifar-10-batches-py`` folder under ``root`` (or ``root`` itself if it is that folder)."""
    path = Path(root)
    return path if path.name == "cifar-10-batches-py" else path / "cifar-10-batches-py"


def load_cifar10(root: str) -> Tuple[Split, Split]:
    """(train, test) CIFAR-10, normalised, from whichever ``data_batch_*`` files exist."""
    folder = cifar_dir(root)
    train_files = sorted(folder.glob("data_batch_[1-5]"))
    if not train_files or not (folder / "test_batch").exists():
        raise DatasetNotFound(f"CIFAR-10 needs {folder}/test_batch and at least one data_batch_N "
                              "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    parts = [_read_cifar_batch(f) for f in train_files]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    logger.info("CIFAR-10: %d training images from %s", len(train[0]), ", ".join(f.name for f in train_files))
    return train, _read_cifar_batch(folder / "test_batch")


def shared_data_dir() -> Optional[str]:
    """``../shared/data`` beside the repository, or $MIXQ_DATA, if it exists (tests and CI use it)."""
    for candidate in (os.environ.get("MIXQ_DATA"), Path(__file__).resolve().parent.parent.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    return None
