"""Per-sample distillation losses; reduction happens at the call site."""

from __future__ import annotations

import torch


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


class PseudoHuberLoss:
    """``mean(sqrt((a - b)^2 + c^2) - c)`` per sample (Song & Dhariwal 2023, eq. 8)."""

    def __init__(self, c: float = 0.001):
        if c <= 0:
            raise ValueError(f"loss.c={c} must be positive")
        self.c = c

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = prediction.float() - target.float()
        return _per_sample_mean(torch.sqrt(diff**2 + self.c**2) - self.c)


class L2Loss:
    """Mean squared error per sample."""

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _per_sample_mean((prediction.float() - target.float()) ** 2)
