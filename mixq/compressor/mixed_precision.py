"""Per-layer quantization sensitivity and automatic mixed precision ("partial PTQ", as in
Meituan's MPQ and OpenVINO's accuracy-aware quantization).

Sensitivity quantizes one layer at a time (the others stay float) with the config list's
settings and ObserverQuantizer calibration, and measures the model output's SQNR and KL
divergence against the float model on calibration data, plus the task metric of ``eval_fn``
when one is given. :func:`auto_mixed_precision` then keeps the most sensitive layers in float
and returns a config list for any quantizer (and so for ``ModelSpeedup``).

Every quantized variant comes from one calibration: ObserverQuantizer observes activations in
float, so a layer's ranges do not depend on which other layers are quantized, and the ranges
measured here are exactly those a user gets by running ObserverQuantizer with the result.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantizers.calib_data import calibration_tensor
from ..quantizers.observer import ObserverQuantizer
from .fake_quant import is_integer_bits
from .wrapper import QuantizerModuleWrapper

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]
ConfigCost = Callable[[List[Dict[str, Any]]], float]
COSTS = ("latency", "size")
_BATCH = 256


@dataclass
class LayerSensitivity:
    """How much quantizing one layer alone hurts the model (higher ``sqnr_db`` = less sensitive)."""

    name: str
    module_type: str
    bits: Dict[str, int]
    sqnr_db: float
    kl: float
    metric: Optional[float] = None
    metric_drop: Optional[float] = None

    def predicted_loss(self) -> float:
        """Additive loss estimate: the metric drop when measured, else the relative output noise power."""
        if self.metric_drop is not None:
            return max(self.metric_drop, 0.0)
        return 10 ** (-self.sqnr_db / 10)


class _SelectiveQuantizer(ObserverQuantizer):
    """ObserverQuantizer whose fake quantization, after ``compress()``, acts only on ``enabled`` layers."""

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]]) -> None:
        super().__init__(model, config_list)
        self.enabled: Set[str] = set()

    def _activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> torch.Tensor:
        if self.compressed and wrapper.name not in self.enabled:
            return x
        return super()._activation(wrapper, qtype, x)

    def quantize_weight(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> torch.Tensor:
        if self.compressed and wrapper.name not in self.enabled:
            return weight
        return super().quantize_weight(wrapper, weight)


def _forward(model: nn.Module, data: torch.Tensor) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(data), _BATCH):
            out = model(data[i:i + _BATCH])
            if not torch.is_tensor(out):
                raise TypeError("sensitivity needs a model with one tensor output; wrap the model so that it returns "
                                "the output to compare")
            outs.append(out.flatten(1).float())
    return torch.cat(outs)


def _calibrated(model: nn.Module, config_list: List[Dict[str, Any]], data: torch.Tensor
                ) -> Tuple[nn.Module, _SelectiveQuantizer]:
    clone = copy.deepcopy(model).eval()
    quantizer = _SelectiveQuantizer(clone, config_list)
    _forward(clone, data)
    quantizer.compress()
    return clone, quantizer


def _sqnr_db(reference: torch.Tensor, out: torch.Tensor) -> float:
    noise = (out - reference).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def _kl(reference: torch.Tensor, out: torch.Tensor) -> float:
    return F.kl_div(F.log_softmax(out, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean").item()


def _quantized_layers(quantizer: _SelectiveQuantizer) -> List[str]:
    return [n for n, w in quantizer.modules_wrapper.items() if any(is_integer_bits(b) for b in w.config.bits.values())]


def layer_sensitivity(model: nn.Module, config_list: List[Dict[str, Any]], calib_data: Any,
                      eval_fn: Optional[EvalFn] = None, num_samples: int = 512) -> List[LayerSensitivity]:
    """Quantize each configured layer alone and measure the damage; most sensitive first.

    ``calib_data``: a tensor of inputs or an iterable of batches (the first ``num_samples`` are
    used to calibrate and to compare outputs). ``eval_fn(model) -> float`` (higher is better,
    e.g. accuracy) adds the task metric and then orders the table by it. ``model`` is not modified.
    """
    data = calibration_tensor(calib_data, num_samples).to(_device(model))
    clone, quantizer = _calibrated(model, config_list, data)
    reference = _forward(clone, data)
    baseline = eval_fn(clone) if eval_fn is not None else None
    rows = []
    for name in _quantized_layers(quantizer):
        quantizer.enabled = {name}
        out = _forward(clone, data)
        metric = eval_fn(clone) if eval_fn is not None else None
        cfg = quantizer.modules_wrapper[name].config
        rows.append(LayerSensitivity(name, cfg.module_type, dict(cfg.bits), _sqnr_db(reference, out), _kl(reference, out),
                                     metric, None if metric is None else baseline - metric))
    quantizer.enabled = set()
    if eval_fn is not None:
        rows.sort(key=lambda r: (-r.metric_drop, r.sqnr_db))
    else:
        rows.sort(key=lambda r: r.sqnr_db)
    return rows


def format_sensitivity_table(rows: Sequence[LayerSensitivity]) -> str:
    """The sensitivity table as aligned text (one layer per line, most sensitive first)."""
    lines = [f"{'layer':<28} {'type':<10} {'bits':<14} {'SQNR dB':>8} {'KL':>9} {'metric':>8} {'drop':>7}"]
    for r in rows:
        bits = ",".join(f"{t[0]}{b}" for t, b in r.bits.items())
        metric = "" if r.metric is None else f"{r.metric:8.2f}"
        drop = "" if r.metric_drop is None else f"{r.metric_drop:7.2f}"
        lines.append(f"{r.name:<28} {r.module_type:<10} {bits:<14} {r.sqnr_db:8.2f} {r.kl:9.2e} {metric:>8} {drop:>7}")
    return "\n".join(lines)


def keep_float_layers(config_list: List[Dict[str, Any]], layers: Sequence[str]) -> List[Dict[str, Any]]:
    """``config_list`` with ``layers`` excluded (kept in float: fp32, or ``extra_layer_bits`` in ModelSpeedup)."""
    result = copy.deepcopy(config_list)
    if layers:
        result.append({"exclude": True, "op_names": sorted(layers)})
    return result


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def layer_costs(model: nn.Module, layers: Sequence[str], example_input: torch.Tensor, cost: str = "latency",
                int8_speedup: float = 3.5) -> Dict[str, Tuple[float, float]]:
    """``{layer: (cost quantized, cost float)}`` under a simple model: ``'latency'`` counts the
    layer's multiply-accumulates per sample (an int8 MAC costs ``1 / int8_speedup`` of a float
    one; layers without weights count their output elements), ``'size'`` its weight bytes
    (1 byte per weight at 8 bits or fewer, 4 in fp32). The MAC model ignores what leaving the
    integer pipeline costs (dequantizing a float layer's input, quantizing its output, neighbours
    that cannot fuse), which dominates on small models: for a real latency budget give
    :func:`auto_mixed_precision` measured costs instead (``benchmarks/mixed_precision.py`` does)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    work: Dict[str, float] = {}

    def hook(name: str):
        def count(module: nn.Module, _args, out) -> None:
            weight = getattr(module, "weight", None)
            if cost == "size":
                work[name] = 0.0 if weight is None else float(weight.numel())
            elif weight is not None and weight.dim() > 1:
                work[name] = float(out[0].numel() * weight[0].numel())
            else:
                work[name] = float(out[0].numel())
        return count

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    float_factor, int_factor = (4.0, 1.0) if cost == "size" else (1.0, 1.0 / int8_speedup)
    return {n: (work.get(n, 0.0) * int_factor, work.get(n, 0.0) * float_factor) for n in layers}


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
    data = calibration_tensor(calib_data, num_samples).to(_device(model))
    rows = list(sensitivity) if sensitivity is not None else layer_sensitivity(model, config_list, data, eval_fn,
                                                                                num_samples)
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
    clone, quantizer = _calibrated(model, config_list, data)
    baseline = eval_fn(clone)
    order = [r.name for r in rows]
    measured: Dict[int, float] = {}

    def drop_with(k: int) -> float:
        if k not in measured:
            quantizer.enabled = set(order[k:])
            measured[k] = baseline - eval_fn(clone)
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
