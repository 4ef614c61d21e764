"""Re-estimate BatchNorm running statistics of a randomly initialised model on real data."""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Replace every BatchNorm's running mean/var by the plain average of its batch statistics
    over ``batches`` (``momentum=None``), so activations have the ranges trained weights would
    give them. Only the BatchNorms run in train mode (dropout, stochastic depth stay off); the
    model is returned in eval mode with the BatchNorms' momentum restored."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    count = 0
    try:
        for batch in batches:
            model(batch)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
    if count == 0:
        raise ValueError("reestimate_bn needs at least one batch")
    logger.info("re-estimated %d BatchNorm layers on %d batches", len(norms), count)
    return model
