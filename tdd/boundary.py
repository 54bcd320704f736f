"""LCM boundary-condition scalings (Luo et al. 2023, eq. 9; consistency models, Song 2023)."""

from __future__ import annotations

import torch


def lcm_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_skip = sd^2 / (st^2 + sd^2)``, ``c_out = st / sqrt(st^2 + sd^2)``, st = t * scale."""
    scaled = t.to(torch.float64) * timestep_scaling
    denominator = scaled**2 + sigma_data**2
    c_skip = sigma_data**2 / denominator
    c_out = scaled / denominator.sqrt()
    return c_skip, c_out
