"""Automatic mixed precision ("partial PTQ", as in Meituan's MPQ and OpenVINO's
accuracy-aware quantization): keep the most sensitive layers (:mod:`.sensitivity`) in float
under an accuracy drop or a cost budget, and return a config list for any quantizer (and so
for ``ModelSpeedup``).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..compressor.model_io import model_device
from ..compressor.module_trace import trace_modules
from ..quantizers.calib_data import calibration_tensor
from .sensitivity import EvalFn, LayerSensitivity, keep_float_layers, layer_sensitivity, quantized_copy

logger = logging.getLogger(__name__)

ConfigCost = Callable[[List[Dict[str, Any]]], float]
COSTS = ("latency", "size")


def layer_costs(model: nn.Module, layers: Sequence[str], example_input: torch.Tensor, cost: str = "latency",
                int8_speedup: float = 3.5) -> Dict[str, Tuple[float, float]]:
    """``{layer: (cost quantized, cost float)}`` under a simple model: ``'latency'`` counts the
    layer's multiply-accumulates per sample, every call of it (an int8 MAC costs ``1 / int8_speedup``
    of a float one; layers without weights count their output elements), ``'size'`` its weight bytes
    (1 byte per weight at 8 bits or fewer, 4 in fp32). The MAC model ignores what leaving the
    integer pipeline costs (dequantizing a float layer's input, quantizing its output, neighbours
    that cannot fuse), which dominates on small models: for a real latency budget give
    :func:`auto_mixed_precision` measured costs instead (``benchmarks/mixed_precision.py`` does)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    work: Dict[str, float] = {n: 0.0 for n in layers}
    for call in trace_modules(model, example_input[:1], {n: model.get_submodule(n) for n in layers}):
        weight, out = getattr(call.module, "weight", None), call.output_tensor
        if cost == "size":  # weights are stored once, however often the layer runs
            work[call.name] = 0.0 if weight is None else float(weight.numel())
        elif out is None:
            continue
        elif weight is not None and weight.dim() > 1:  # every call computes: a layer run twice costs twice
            work[call.name] += float(out[0].numel() * weight[0].numel())
        else:
            work[call.name] += float(out[0].numel())
    float_factor, int_factor = (4.0, 1.0) if cost == "size" else (1.0, 1.0 / int8_speedup)
    return {n: (work[n] * int_factor, work[n] * float_factor) for n in layers}


def auto_mixed_precision(model: nn.Module, config_list: List[Dict[str, Any]], calib_data: Any,
                         eval_fn: Optional[EvalFn] = None, *, max_drop: Optional[float] = None,
                         budget: Optional[float] = None, cost: Union[str, ConfigCost] = "latency",
                         int8_speedup: float = 3.5,
                         sensitivity: Optional[Sequence[LayerSensitivity]] = None,
                         num_samples: int = 512) -> List[Dict[str, Any]]:
    """A config list that keeps the most sensitive layers of ``config_list`` in float.

    Give exactly one goal:

    * ``max_drop`` (needs ``eval_fn``): the fewest float layers whose quantized model stays
      within ``max_drop`` of the float model's ``eval_fn``; layers are reverted in sensitivity
      order and the count is found by bisection on measured ``eval_fn`` values.
    * ``budget``: cost at most ``budget`` times that of quantizing every layer (1.25 keeps 80% of
      the speedup). With ``cost='latency'`` or ``'size'`` (the models of :func:`layer_costs`) layers
      are reverted greedily by predicted loss saved per unit of cost added. With a callable
      ``cost(config_list) -> float`` that measures a whole config (an engine's latency, say),
      layers are tried in sensitivity order and each is kept only if the measured config stays
      within the budget: one measurement per candidate, and no assumption that costs add up
      (on ONNX Runtime a float layer between integer ones also costs the Q/DQ around it and the
      fusions it breaks, so they do not).

    Only layers with quantized weights (conv/linear) are candidates; activation-only entries stay as
    configured. ``sensitivity`` reuses a :func:`layer_sensitivity` table. ``model`` is not modified.
    """
    if (max_drop is None) == (budget is None):
        raise ValueError("give exactly one goal: max_drop=<allowed metric drop> or budget=<cost relative to uniform "
                         "quantization, >= 1>")
    if max_drop is not None and eval_fn is None:
        raise ValueError("max_drop needs eval_fn(model) -> metric to measure the drop; without one use budget=")
    if budget is not None and budget < 1.0:
        raise ValueError(f"budget is the cost relative to quantizing every layer, so it must be >= 1, got {budget}")
    data = calibration_tensor(calib_data, num_samples).to(model_device(model))
    rows = list(sensitivity) if sensitivity is not None else layer_sensitivity(model, config_list, data, eval_fn,
                                                                                len(data))
    rows = [r for r in rows if "weight" in r.bits]
    if budget is not None and callable(cost):
        keep = _within_measured_budget(config_list, rows, budget, cost)
    elif budget is not None:
        keep = _within_budget(model, rows, data, budget, cost, int8_speedup)
    else:
        keep = _within_drop(model, config_list, data, rows, eval_fn, max_drop)
    logger.info("mixed precision keeps %d of %d layers in float: %s", len(keep), len(rows), ", ".join(keep) or "none")
    return keep_float_layers(config_list, keep)


def _within_budget(model: nn.Module, rows: List[LayerSensitivity], data: torch.Tensor, budget: float, cost: str,
                   int8_speedup: float) -> List[str]:
    costs = layer_costs(model, [r.name for r in rows], data, cost, int8_speedup)
    total = sum(c[0] for c in costs.values())
    limit = budget * total
    by_value = sorted(rows, key=lambda r: r.predicted_loss() / max(costs[r.name][1] - costs[r.name][0], 1e-12),
                      reverse=True)
    keep = []
    for row in by_value:
        added = costs[row.name][1] - costs[row.name][0]
        if row.predicted_loss() > 0 and total + added <= limit:
            keep.append(row.name)
            total += added
    return keep


def _within_measured_budget(config_list: List[Dict[str, Any]], rows: List[LayerSensitivity], budget: float,
                            cost: ConfigCost) -> List[str]:
    limit = budget * cost(config_list)
    keep: List[str] = []
    for row in sorted(rows, key=lambda r: r.predicted_loss(), reverse=True):
        if row.predicted_loss() <= 0:
            break
        measured = cost(keep_float_layers(config_list, keep + [row.name]))
        logger.info("%s in float too: cost %.4g (limit %.4g)", row.name, measured, limit)
        if measured <= limit:
            keep.append(row.name)
    return keep


def _within_drop(model: nn.Module, config_list: List[Dict[str, Any]], data: torch.Tensor,
                 rows: List[LayerSensitivity], eval_fn: EvalFn, max_drop: float) -> List[str]:
    baseline = eval_fn(copy.deepcopy(model).eval())
    order = [r.name for r in rows]
    measured: Dict[int, float] = {}

    def drop_with(k: int) -> float:
        if k not in measured:
            quantized = quantized_copy(model, keep_float_layers(config_list, order[:k]), data)
            measured[k] = baseline - eval_fn(quantized)
            logger.info("%d layers in float: metric drop %.3f", k, measured[k])
        return measured[k]

    lo, hi = 0, len(order)  # hi always satisfies the goal (nothing quantized)
    if drop_with(0) <= max_drop:
        return []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if drop_with(mid) <= max_drop:
            hi = mid
        else:
            lo = mid
    return order[:hi]
