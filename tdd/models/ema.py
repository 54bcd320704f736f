"""Exponential moving average of a network's weights (the EMA target, the toy teacher)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(average: nn.Module, online: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * online``, parameter by parameter."""
    for mean, parameter in zip(average.parameters(), online.parameters()):
        mean.lerp_(parameter.detach(), 1.0 - decay)
