"""Issue #13, items 1 and 13: a forward the exporter cannot follow never builds a silently wrong
engine, and a keyword-only forward parameter is not a traceback.

The reference is the torch model itself, run on the same inputs as the engine.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixq.speedup import ModelSpeedup
from mixq.placement.export_check import (LOOSE_FACTOR, MAX_TOLERANCE, NOISE_FACTOR, RTOL, ExportMismatchError, _session,
                                         rounding_tolerance, verification_batches)
from mixq.placement.onnx_export import export_onnx, quiet_export


class NoExport(nn.Module):
    """The issue's model: the input leaves torch, so the trace records it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.from_numpy(x.detach().numpy() * 2))


class Branch(nn.Module):
    """Data-dependent control flow: the trace keeps the example's branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class PythonFloat(nn.Module):
    """A tensor turned into a Python number: the trace bakes in the example's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x) * float(x.abs().max())


class FixedBatch(nn.Module):
    """A batch size read as a Python int: the graph only runs the example's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x.reshape(len(x), 2, 4).flatten(1))


class KeywordOnly(nn.Module):
    """``forward(self, x, *, temperature=2.0)``: the TorchScript exporter passes inputs by position."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x, *, temperature=2.0):
        return self.fc(x) / temperature


@pytest.mark.parametrize("model_cls, fragment", [
    (NoExport, "Converting a tensor to a NumPy array"),
    (Branch, "Converting a tensor to a Python boolean"),
    (PythonFloat, "Converting a tensor to a Python float"),
    (FixedBatch, "the graph fails on a batch of 3"),  # and: "Using len to get tensor shape"
])
def test_untraceable_forward_is_refused_naming_the_cause(model_cls, fragment):
    torch.manual_seed(0)
    with pytest.raises(ExportMismatchError, match="does not compute what the model computes") as info:
        ModelSpeedup(model_cls().eval(), (4, 8)).compress()
    message = str(info.value)
    assert fragment in message and len(message.splitlines()) == 1
    assert "test_hardening_export.py:" in message  # the exporter's warning says where the trace broke


def test_the_issue_model_no_longer_builds_an_engine_that_ignores_its_input():
    torch.manual_seed(0)
    with pytest.raises(ExportMismatchError):
        ModelSpeedup(NoExport().eval(), (4, 8)).compress()


def test_verification_batches_take_the_other_branch():
    example = [torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([[1, 2], [3, 4]])]
    first, second = verification_batches(example)
    assert [t.shape[0] for t in first] == [3, 3] and [t.shape[0] for t in second] == [1, 1]
    assert torch.equal(second[0], -2 * first[0][:1])  # negated: a branch on the sign goes the other way
    assert torch.equal(first[1], example[1][[0, 1, 0]]) and first[1].dtype == torch.int64  # ids stay valid


def test_keyword_only_parameters_keep_their_defaults():
    torch.manual_seed(0)
    model = KeywordOnly().eval()
    engine = ModelSpeedup(model, (4, 8)).compress()
    x = torch.randn(5, 8)
    torch.testing.assert_close(engine.inference(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_quiet_export_surfaces_tracer_warnings_only():
    with quiet_export() as tracer:
        warnings.warn("deprecated exporter option", DeprecationWarning)
        warnings.warn("Converting a tensor to a Python index", torch.jit.TracerWarning)
    assert len(tracer) == 1 and tracer[0].startswith("Converting a tensor to a Python index (")


class TracedFine(nn.Module):
    """Warns while tracing (a shape check turned into a Python bool) but exports correctly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        assert bool(x.shape[1] == torch.tensor(8)), "8 features"
        return self.fc(x)


def test_a_tracer_warning_on_a_correct_graph_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="mixq.placement.export_check"):
        exported = export_onnx(TracedFine().eval(), (torch.randn(2, 8),), {})
    assert exported.model.graph.node
    assert any("the ONNX exporter warned" in r.getMessage() and "Python boolean" in r.getMessage()
               for r in caplog.records)


class Chaotic(nn.Module):
    """Eight sin(Linear) layers that multiply float32 rounding differences, as a deep random
    network does: ONNX Runtime and torch differ by over 0.1% of the output, and so does torch in
    float32 against torch in float64 (with ``std=1.3``, by a quarter of the output)."""

    def __init__(self, std: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(8))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=std)

    def forward(self, x):
        for layer in self.layers:
            x = torch.sin(layer(x))
        return x


def test_float32_rounding_amplified_by_the_model_is_not_a_broken_trace(caplog):
    model = Chaotic().eval()
    exported = export_onnx(model, (torch.randn(2, 32),), {}, verify=False)
    batch = verification_batches([torch.randn(2, 32)])[1][0]
    with torch.no_grad():
        expected = model(batch).numpy()
    actual = _session(exported.model).run(None, {"input": batch.numpy()})[0]
    assert np.abs(actual - expected).max() / np.abs(expected).max() > RTOL  # the plain check would refuse it
    with caplog.at_level(logging.INFO, logger="mixq.placement.export_check"):
        export_onnx(model, (torch.randn(2, 32),), {})
    assert any("float32 rounding only" in r.getMessage() for r in caplog.records)


def test_rounding_tolerance_grows_with_the_models_own_float32_error():
    assert rounding_tolerance(0.0) == RTOL
    assert rounding_tolerance(0.002) == pytest.approx(NOISE_FACTOR * 0.002)
    assert rounding_tolerance(0.03) == MAX_TOLERANCE  # capped: up to here a broken trace still shows
    assert rounding_tolerance(0.27) == pytest.approx(LOOSE_FACTOR * 0.27)  # EfficientNet-B0 at 224, random weights
    grid = np.linspace(0, 1, 201)
    assert np.all(np.diff([rounding_tolerance(n) for n in grid]) >= 0)


def test_a_model_whose_own_float32_error_exceeds_the_cap_exports_with_a_warning(caplog):
    model = Chaotic(std=1.3).eval()
    exported = export_onnx(model, (torch.randn(2, 32),), {}, verify=False)
    errors = []
    for batch in verification_batches([torch.randn(2, 32)]):
        with torch.no_grad():
            expected = model(batch[0]).numpy()
        actual = _session(exported.model).run(None, {"input": batch[0].numpy()})[0]
        errors.append(np.abs(actual - expected).max() / np.abs(expected).max())
    assert max(errors) > MAX_TOLERANCE  # a tolerance capped at MAX_TOLERANCE refused this correct graph
    with caplog.at_level(logging.WARNING, logger="mixq.placement.export_check"):
        export_onnx(model, (torch.randn(2, 32),), {})
    assert any("amplifies float32 rounding" in r.getMessage() for r in caplog.records)


def test_a_traceable_model_exports_without_warnings(caplog, trained_mnist):
    model, _ = trained_mnist
    with caplog.at_level(logging.WARNING):
        export_onnx(model.eval(), (torch.randn(2, 1, 28, 28),), {})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
