"""The dynamo exporter's optional dependency: a missing ``onnxscript`` is a clear error naming
the install command (simulated by hiding the package), whatever is installed here."""
import sys

import pytest
import torch

from mixq.models import MnistNet
from mixq.speedup import ModelSpeedup
from mixq.placement.onnx_export import export_onnx

INSTALL = r'exporter=.dynamo. needs the onnxscript package: pip install "mixq\[dynamo\]" ' \
          r'\(from a source checkout: pip install -e "\.\[dynamo\]"\)'


def test_dynamo_without_onnxscript_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(ModuleNotFoundError, match=INSTALL):
        export_onnx(MnistNet().eval(), (torch.randn(2, 1, 28, 28),), {}, "dynamo")
    with pytest.raises(ModuleNotFoundError, match=INSTALL):
        ModelSpeedup(MnistNet(), (1, 1, 28, 28), exporter="dynamo").compress()


def test_unknown_exporter_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown exporter 'onnx'; use one of \['torchscript', 'dynamo'\]"):
        export_onnx(MnistNet().eval(), (torch.randn(2, 1, 28, 28),), {}, "onnx")
