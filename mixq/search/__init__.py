"""Searching a config: per-layer sensitivity and automatic mixed precision (above the quantizers)."""
from .auto_precision import auto_mixed_precision, keep_float_layers, layer_costs
from .sensitivity import LayerSensitivity, format_sensitivity_table, layer_sensitivity

__all__ = ["LayerSensitivity", "auto_mixed_precision", "format_sensitivity_table", "keep_float_layers", "layer_costs",
           "layer_sensitivity"]
