"""Does the exported fp32 ONNX graph compute what the torch model computes?

A tracing exporter records the operations one example took. A forward that leaves torch
(``x.numpy()``, ``float(x)``, ``.item()``) or branches on data (``if x.sum() > 0``) exports a
graph that ignores its input or always takes the example's branch, and an engine built from it
is silently wrong. So after every export the graph is run by ONNX Runtime on two batches unlike
the example (other batch sizes; random floats, then the first sample negated and doubled, so a
branch on the sign or the size of the data goes the other way) and compared with the model. A
difference refuses the export, naming the output, how much it differs and the exporter's own
TracerWarnings (which say where in the forward the trace broke).

A deep network can amplify float32 rounding (random weights, off-distribution inputs): where the
graph is off by more than :data:`RTOL`, the model is run once more in float64, and the graph is
accepted when it is within :data:`NOISE_FACTOR` times torch's own float32 error, at most
:data:`MAX_TOLERANCE`, or within :data:`LOOSE_FACTOR` times that error where this is more: a
model whose own float32 error is that large (a random-weight EfficientNet-B0 at 224x224: 27% of
its largest logit) could not otherwise be exported at all. The looser check logs a warning
saying how coarse it was.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import numpy as np
import onnx
import torch

logger = logging.getLogger(__name__)

VERIFY_BATCH = 3  # then 1: not the example's batch size, so a batch size baked into the graph shows
RTOL = 1e-3       # of the output's largest magnitude; fp32 kernels differ by ~1e-6
NOISE_FACTOR = 10  # a graph within this many times torch's own float32 error (vs float64) matches
MAX_TOLERANCE = 0.1
LOOSE_FACTOR = 2  # beyond MAX_TOLERANCE: within this many times torch's own float32 error
_MAX_PROTO = 2 ** 31 - 1
FIX = ("make the forward traceable: keep the computation in torch operations on the input tensors (no .numpy(), "
       ".item(), float(x) or Python conditions on tensor values)")


class ExportMismatchError(ValueError):
    """The exported graph does not compute what the model computes."""


def verification_batches(example: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
    """Two input batches unlike ``example``: :data:`VERIFY_BATCH` samples of random normal floats,
    then the first of them negated and doubled; integer inputs (token ids...) repeat the example's rows."""
    gen = torch.Generator().manual_seed(1234)
    first = []
    for t in example:
        rows = torch.arange(VERIFY_BATCH) % max(t.shape[0], 1) if t.dim() else None
        if t.is_floating_point():
            first.append(torch.randn((VERIFY_BATCH,) + tuple(t.shape[1:]), generator=gen).to(t.dtype))
        else:
            first.append(t[rows] if rows is not None else t)
    second = [t if not t.dim() else t[:1] * -2 if t.is_floating_point() else t[:1] for t in first]
    return [first, second]


def _relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest absolute difference over the largest finite magnitude of ``expected``."""
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    same = (e == a) | (np.isnan(e) & np.isnan(a))
    diff = np.where(same, 0.0, np.nan_to_num(np.abs(e - a), nan=np.inf))
    finite = np.abs(e[np.isfinite(e)])
    return float(diff.max(initial=0.0)) / max(float(finite.max(initial=0.0)), 1e-6)


def _mismatch(name: str, expected: np.ndarray, actual: np.ndarray, tolerance: float = RTOL) -> Optional[str]:
    """How output ``name`` of the graph differs from torch's, or None when it matches."""
    if expected.shape != actual.shape:
        return f"output {name!r} has shape {actual.shape} in the graph but {expected.shape} in torch"
    if expected.dtype.kind not in "fc":
        wrong = float(np.mean(expected != actual)) if expected.size else 0.0
        return f"{wrong:.0%} of output {name!r} differs" if wrong else None
    error = _relative_error(expected, actual)
    return f"output {name!r} differs by {error:.1%} of its largest value" if error > tolerance else None


def rounding_tolerance(noise: float) -> float:
    """How far (of the largest output) the graph may differ from a model whose own float32 output
    is ``noise`` off its float64 output (see the module docstring)."""
    return max(RTOL, min(NOISE_FACTOR * noise, max(MAX_TOLERANCE, LOOSE_FACTOR * noise)))


def _float32_noise(expected: Sequence[np.ndarray], batch: List[torch.Tensor],
                   run_float64: Optional[Callable[[List[torch.Tensor]], List[torch.Tensor]]]) -> Optional[List[float]]:
    """Torch's own float32 error per output (against the model in float64), or None where it cannot run."""
    if run_float64 is None:
        return None
    try:
        with torch.no_grad():
            exact = [t.detach().cpu().numpy() for t in run_float64([t.double() if t.is_floating_point() else t
                                                                    for t in batch])]
    except Exception as exc:  # a model that cannot run in float64 keeps the plain tolerance
        logger.info("the model cannot run in float64 to measure its float32 error (%s)", exc)
        return None
    return [_relative_error(x, e) if e.dtype.kind in "fc" and e.shape == x.shape else 0.0
            for e, x in zip(expected, exact)]


def _session(proto: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # a failing run is reported by the exception, not by ONNX Runtime's log
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _quiet_run():
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def verify_export(proto: onnx.ModelProto, input_names: Sequence[str], output_names: Sequence[str],
                  run_torch: Callable[[List[torch.Tensor]], List[torch.Tensor]], example: Sequence[torch.Tensor],
                  tracer_warnings: Sequence[str] = (),
                  run_float64: Optional[Callable[[List[torch.Tensor]], List[torch.Tensor]]] = None) -> None:
    """Raise :class:`ExportMismatchError` when ``proto`` and ``run_torch`` (the model on flat
    inputs, returning flat outputs) disagree on :func:`verification_batches` of ``example``;
    ``run_float64`` (the model in float64) measures how far float32 rounding alone carries."""
    if proto.ByteSize() > _MAX_PROTO:
        logger.warning("the exported graph is larger than 2 GB; it was not compared with the model")
        return
    try:
        session = _session(proto)
    except Exception as exc:  # an operator ONNX Runtime lacks: another backend may still build it
        logger.warning("ONNX Runtime cannot load the exported graph to compare it with the model (%s)",
                       " ".join(str(exc).split())[:300])
        return
    graph_inputs = {i.name for i in session.get_inputs()}
    run_options = _quiet_run()
    for i, batch in enumerate(verification_batches(example)):
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in run_torch(batch)]
        feed = {n: t.numpy() for n, t in zip(input_names, batch) if n in graph_inputs}
        try:
            actual = session.run(list(output_names), feed, run_options)
        except Exception as exc:
            problem = f"the graph fails on a batch of {len(batch[0])} ({' '.join(str(exc).split())[:300]})"
        else:
            problem = next((p for p in map(_mismatch, output_names, expected, actual) if p), None)
            noise = _float32_noise(expected, batch, run_float64) if problem else None
            if noise is not None:
                tolerances = [rounding_tolerance(n) for n in noise]
                problem = next((p for p in map(_mismatch, output_names, expected, actual, tolerances) if p), None)
                if problem:
                    problem += f" (torch's own float32 error is {max(noise):.2%})"
                elif max(tolerances) > MAX_TOLERANCE:
                    logger.warning("the model amplifies float32 rounding: its own float32 output is off its float64 "
                                   "output by %.0f%% of the largest value, so the exported graph could only be "
                                   "checked to within %.0f%% (a broken trace that changes the output by less would "
                                   "pass)", 100 * max(noise), 100 * max(tolerances))
                else:
                    logger.info("the exported graph differs from the model by float32 rounding only (torch's own "
                                "float32 error: %.2g of the largest output)", max(noise))
        if problem:
            cause = f"; the exporter warned: {tracer_warnings[0]}" if tracer_warnings else ""
            raise ExportMismatchError(f"the exported ONNX graph does not compute what the model computes: on "
                                      f"{'a random batch' if i == 0 else 'a negated, doubled sample'}, {problem}"
                                      f"{cause}. The exporter traced one example and cannot follow this "
                                      f"forward: {FIX}")
    for message in tracer_warnings:
        logger.warning("the ONNX exporter warned (the graph matched the model on two test batches): %s", message)
