"""Per-layer quantization sensitivity: one layer quantized at a time (the others float), the
model output's SQNR and KL divergence against the float model on calibration data, plus the
task metric of ``eval_fn`` when one is given.

Each variant is a real ObserverQuantizer run with the config restricted to that layer (the others
excluded), so its Q/DQ placement is the backend's own for that config (a layer alone may bring
integer neighbours with it) and its ranges are exactly those a user gets with that config: one
calibration per layer, no shortcut that shares placements between configs.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compressor.fake_quant import is_integer_bits
from ..compressor.model_io import model_device
from ..quantizers.calib_data import calibration_tensor
from ..quantizers.observer import ObserverQuantizer

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]
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


def keep_float_layers(config_list: List[Dict[str, Any]], layers: Sequence[str]) -> List[Dict[str, Any]]:
    """``config_list`` with ``layers`` excluded (kept in float: fp32, or ``extra_layer_bits`` in ModelSpeedup)."""
    result = copy.deepcopy(config_list)
    if layers:
        result.append({"exclude": True, "op_names": sorted(layers)})
    return result


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


def quantized_copy(model: nn.Module, config_list: List[Dict[str, Any]], data: torch.Tensor) -> nn.Module:
    """A copy of ``model`` quantized by ObserverQuantizer with ``config_list``, calibrated on ``data``
    (the backend's own placement for exactly this config)."""
    clone = copy.deepcopy(model).eval()
    quantizer = ObserverQuantizer(clone, config_list, distributed=False)  # a local probe
    _forward(clone, data)
    quantizer.compress()
    return clone


def _integer_layers(model: nn.Module, config_list: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``{layer: its LayerConfig}`` for the layers ``config_list`` quantizes to integers."""
    probe = ObserverQuantizer(copy.deepcopy(model), config_list, distributed=False)
    return {n: w.config for n, w in probe.modules_wrapper.items()
            if any(is_integer_bits(b) for b in w.config.bits.values())}


def _sqnr_db(reference: torch.Tensor, out: torch.Tensor) -> float:
    noise = (out - reference).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def _kl(reference: torch.Tensor, out: torch.Tensor) -> float:
    return F.kl_div(F.log_softmax(out, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean").item()


def layer_sensitivity(model: nn.Module, config_list: List[Dict[str, Any]], calib_data: Any,
                      eval_fn: Optional[EvalFn] = None, num_samples: int = 512) -> List[LayerSensitivity]:
    """Quantize each configured layer alone and measure the damage; most sensitive first.

    ``calib_data``: a tensor of inputs or an iterable of batches (the first ``num_samples`` are
    used to calibrate and to compare outputs). ``eval_fn(model) -> float`` (higher is better,
    e.g. accuracy) adds the task metric and then orders the table by it. ``model`` is not modified.
    """
    data = calibration_tensor(calib_data, num_samples).to(model_device(model))
    model = copy.deepcopy(model).eval()
    reference = _forward(model, data)
    baseline = eval_fn(model) if eval_fn is not None else None
    layers = _integer_layers(model, config_list)
    rows = []
    for i, (name, cfg) in enumerate(layers.items()):
        logger.info("sensitivity %d/%d: %s", i + 1, len(layers), name)
        alone = quantized_copy(model, keep_float_layers(config_list, [n for n in layers if n != name]), data)
        out = _forward(alone, data)
        metric = eval_fn(alone) if eval_fn is not None else None
        rows.append(LayerSensitivity(name, cfg.module_type, dict(cfg.bits), _sqnr_db(reference, out), _kl(reference, out),
                                     metric, None if metric is None else baseline - metric))
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
