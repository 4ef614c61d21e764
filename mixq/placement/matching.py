"""Which torch tensor (point key) each ONNX tensor is, found by value on one example batch.

The fp32 ONNX graph and the torch model run on the same inputs; an ONNX tensor is the torch
tensor with the same shape and the same values (up to float rounding: BatchNorm is folded in
the graph). Exporters rename, fold and decompose freely, but they never change what a tensor
holds, so this needs no knowledge of either exporter's naming. Among equal tensors (a Dropout
or a view that passes values through) the earliest computed is taken: quantizing it there
is what every later reader of the ONNX tensor sees.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..compressor.call_points import PointKey, key_module
from ..compressor.model_io import ModelInputs

RTOL = 1e-3
ATOL = 1e-5


def probe_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for matching, with normalisation statistics, affine parameters and
    biases redrawn (seeded): freshly initialised layers compute near-identities (a new BatchNorm,
    a LayerNorm with unit scale, a zero bias that makes a Linear's MatMul equal its output), which
    would make two different tensors equal by accident."""
    copy_ = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in copy_.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and \
                    getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
                scale = float(m.weight.std()) if m.weight.numel() > 1 else 0.1
                m.bias.add_(torch.randn(m.bias.shape, generator=gen) * scale)
    return copy_


def probe_inputs(example: ModelInputs) -> ModelInputs:
    """``example`` with integer inputs redrawn uniformly within their own range (seeded): a mask
    of ones or repeated token ids would make tensors equal by accident (``emb * mask == emb``)."""
    gen = torch.Generator().manual_seed(4321)

    def redraw(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.dtype == torch.bool or t.numel() == 0:
            return t
        lo, hi = int(t.min()), int(t.max())
        lo = min(lo, 0) if lo == hi else lo  # a constant (a mask of ones) varies between 0 and it
        return t if lo == hi else torch.randint(lo, hi + 1, t.shape, generator=gen, dtype=t.dtype)

    return example.map(redraw)


def onnx_tensor_values(model: onnx.ModelProto, inputs: ModelInputs, names: Iterable[str]) -> Dict[str, np.ndarray]:
    """Values of the float tensors ``names`` of ``model`` on ``inputs`` (ONNX Runtime, no graph
    optimization, so every tensor exists as written)."""
    import onnxruntime as ort

    wanted = [n for n in dict.fromkeys(names)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for name in wanted:
        if name not in existing and name not in graph_inputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    arrays = dict(zip(inputs.names(), (t.detach().cpu().numpy() for t in inputs.tensors())))
    feed = {i.name: arrays[i.name] for i in session.get_inputs()}
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(out_names, feed)))
    values.update(feed)
    return {n: np.asarray(values[n]) for n in wanted if n in values}


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return bool(np.max(np.abs(a - b), initial=0.0) <= ATOL + RTOL * scale)


def match_tensors(onnx_values: Mapping[str, np.ndarray], torch_values: Mapping[PointKey, torch.Tensor],
                  allow_inputs: bool = False) -> Dict[str, PointKey]:
    """``{onnx tensor: point key}`` for every ONNX tensor a torch tensor equals.

    Module-input keys are only taken with ``allow_inputs`` (they name the same tensor as the
    output that produced it, which is preferred).
    """
    by_shape: Dict[Tuple[int, ...], List[Tuple[PointKey, np.ndarray]]] = defaultdict(list)
    for key, tensor in torch_values.items():
        module = key_module(key)
        if module is not None and module[2] is not None and not allow_inputs:
            continue
        by_shape[tuple(tensor.shape)].append((key, tensor.detach().cpu().numpy()))
    result = {}
    for name, value in onnx_values.items():
        for key, candidate in by_shape.get(tuple(value.shape), []):
            if _close(value, candidate):
                result[name] = key
                break
    return result


def find_tensor(value: np.ndarray, onnx_values: Mapping[str, np.ndarray], order: Sequence[str]) -> Optional[str]:
    """The first tensor (in ``order``) of ``onnx_values`` that holds ``value``."""
    for name in order:
        candidate = onnx_values.get(name)
        if candidate is not None and candidate.shape == value.shape and _close(candidate, value):
            return name
    return None


def match_input(value: np.ndarray, torch_values: Mapping[PointKey, torch.Tensor], module: str,
                call: int) -> Optional[PointKey]:
    """The input key of call ``call`` of ``module`` whose value is ``value``, if any."""
    prefix = f"{module}@{call}:in"
    for key, tensor in torch_values.items():
        if key.startswith(prefix) and tuple(tensor.shape) == value.shape and _close(value, tensor.numpy()):
            return key
    return None
