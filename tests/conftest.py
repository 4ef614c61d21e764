"""Shared fixtures: the vendored MNIST split and an fp32 MNIST model trained once per session.

Tests parametrized with ``exporter='dynamo'`` are skipped, saying why, where the optional
``onnxscript`` package (``pip install mixq[dynamo]``, part of ``mixq[test]``) is missing.
"""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from mixq.datasets import load_mnist, shared_data_dir
from mixq.models import MnistNet, accuracy, train_epochs
from mixq.placement.onnx_export import DYNAMO_INSTALL_HINT

HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


def pytest_collection_modifyitems(config, items):
    """Skip the dynamo-exporter cases when onnxscript is not installed."""
    if HAS_ONNXSCRIPT:
        return
    skip = pytest.mark.skip(reason=f"exporter='dynamo' needs onnxscript: {DYNAMO_INSTALL_HINT}")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("exporter") == "dynamo":
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist():
    """((train_x, train_y), (test_x, test_y)): the vendored official test set split 8,000/2,000."""
    train, test, _ = load_mnist()
    return train, test


@pytest.fixture(scope="session")
def _trained_mnist(mnist):
    torch.manual_seed(0)
    model = MnistNet()
    (xtr, ytr), (xte, yte) = mnist
    train_epochs(model, xtr, ytr, epochs=2, lr=0.01, seed=0)
    return model, accuracy(model, xte, yte)


@pytest.fixture
def trained_mnist(_trained_mnist):
    """(a fresh copy of the trained fp32 MNIST model, its test accuracy in percent)."""
    model, acc = _trained_mnist
    return copy.deepcopy(model), acc


@pytest.fixture(scope="session")
def cifar_root():
    """The shared data root holding cifar-10-batches-py; skips when it is absent."""
    root = shared_data_dir()
    if root is None or not Path(root, "cifar-10-batches-py").is_dir():
        pytest.skip("CIFAR-10 data not found: needs ../shared/data/cifar-10-batches-py (or $MIXQ_DATA)")
    return root
