"""Finding Conv -> BatchNorm pairs by running the model once (works for any forward code)."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

from .model_io import ModelInputs
from .wrapped import is_wrapper

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def find_conv_bn_pairs(model: nn.Module, dummy_input: Any) -> Dict[str, str]:
    """``{conv_name: bn_name}`` for every BatchNorm whose input is exactly a conv's output.

    Runs one eval-mode forward of ``dummy_input`` (a tensor, a tuple of positional inputs or a
    dict of keyword inputs)
    with hooks that compare tensor identity, so no assumption is made about module order.
    A conv wrapped by a quantizer is reported under the wrapper's name.
    """
    conv_outputs: Dict[int, tuple] = {}
    bn_inputs: Dict[str, torch.Tensor] = {}
    handles = []

    def conv_hook(name: str, channels: int):
        def hook(_module, _inputs, output):
            conv_outputs[id(output)] = (name, channels, output)
        return hook

    def bn_hook(name: str):
        def hook(_module, inputs):
            bn_inputs[name] = inputs[0]
        return hook

    wrapped = {id(m.module) for m in model.modules() if is_wrapper(m)}
    for name, module in model.named_modules():
        inner = module.module if is_wrapper(module) else module
        if isinstance(inner, _CONVS) and id(module) not in wrapped:
            handles.append(module.register_forward_hook(conv_hook(name, inner.out_channels)))
        elif isinstance(module, _BNS):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ModelInputs.of(dummy_input).call(model)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    pairs = {}
    for bn_name, tensor in bn_inputs.items():
        hit = conv_outputs.get(id(tensor))
        if hit is not None and hit[1] == model.get_submodule(bn_name).num_features:
            pairs[hit[0]] = bn_name
    return pairs
