"""Finding Conv -> BatchNorm pairs from the model's traced view (works for any forward code)."""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn

from .module_trace import trace_modules
from .wrapped import is_wrapper

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def find_conv_bn_pairs(model: nn.Module, dummy_input: Any) -> Dict[str, str]:
    """``{conv_name: bn_name}`` for every BatchNorm whose input is exactly a conv's output.

    One eval-mode forward of ``dummy_input`` (a tensor, a tuple of positional inputs or a dict
    of keyword inputs) traced by :func:`.module_trace.trace_modules`: tensor identity links the
    two, so no assumption is made about module order. A conv wrapped by a quantizer is reported
    under the wrapper's name.
    """
    wrapped = {id(m.module) for m in model.modules() if is_wrapper(m)}
    convs, bns = {}, {}
    for name, module in model.named_modules():
        inner = module.module if is_wrapper(module) else module
        if isinstance(inner, _CONVS) and id(module) not in wrapped:
            convs[name] = inner.out_channels
        elif isinstance(module, _BNS):
            bns[name] = module.num_features
    calls = trace_modules(model, dummy_input, {n: model.get_submodule(n) for n in list(convs) + list(bns)})
    conv_of_output = {c.output_id: c.name for c in calls if c.name in convs}
    pairs = {}
    for call in calls:
        conv = conv_of_output.get(call.input_id) if call.name in bns else None
        if conv is not None and convs[conv] == bns[call.name]:
            pairs[conv] = call.name
    return pairs
