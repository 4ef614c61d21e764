"""Offline data readers: vendored MNIST, CIFAR batches (str or bytes keys), safe unpickling."""
import hashlib
import os
import pickle

import numpy as np
import pytest

from mixq.datasets import VENDORED_DATA, DatasetNotFound, load_cifar10, load_mnist


def test_vendored_mnist_is_the_official_test_set():
    raw = VENDORED_DATA / "MNIST" / "raw"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in raw.glob("*.gz")}
    assert md5 == {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                   "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
    (xtr, ytr), (xte, yte), source = load_mnist(root="/nonexistent")
    assert xtr.shape == (8000, 1, 28, 28) and xte.shape == (2000, 1, 28, 28)
    assert str(VENDORED_DATA) in source
    assert np.bincount(ytr.numpy()).min() > 600  # all ten digits present in the train split


def _write_batch(path, n, key_type):
    rng = np.random.default_rng(0)
    batch = {key_type("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key_type("labels"): list(rng.integers(0, 10, n))}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh)


@pytest.mark.parametrize("key_type", [str, lambda s: s.encode()])
def test_cifar_reads_partial_training_batches(tmp_path, key_type):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_batch(folder / "data_batch_1", 20, key_type)
    _write_batch(folder / "data_batch_3", 10, key_type)
    _write_batch(folder / "test_batch", 5, key_type)
    (xtr, ytr), (xte, yte) = load_cifar10(str(tmp_path))
    assert xtr.shape == (30, 3, 32, 32) and xte.shape == (5, 3, 32, 32) and len(ytr) == 30


def test_cifar_missing_files_message(tmp_path):
    with pytest.raises(DatasetNotFound, match="test_batch and at least one data_batch"):
        load_cifar10(str(tmp_path))


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    for name in ("data_batch_1", "test_batch"):
        (folder / name).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        load_cifar10(str(tmp_path))


def test_real_cifar_when_available(cifar_root):
    (xtr, ytr), (xte, yte) = load_cifar10(cifar_root)
    assert xte.shape == (10000, 3, 32, 32) and len(set(yte.tolist())) == 10
