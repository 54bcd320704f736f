"""Model outputs to (x0, eps), the DDIM map and re-noising (docs/methods.md sections 0 and 3)."""

from __future__ import annotations

import torch

from tdd.schedule import NoiseSchedule, append_dims

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_x0_eps(
    output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an epsilon / v / sample prediction at ``x_t = a x0 + s eps`` to (x0, eps)."""
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * output
        eps = sigma * x_t + alpha * output
    elif prediction_type == "sample":
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    else:
        expected = ", ".join(PREDICTION_TYPES)
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {expected}")
    return x0, eps


def ddim_map(
    x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """DDIM map to timestep s: ``x_s = a_s * x0 + s_s * eps`` (Song et al. 2021, eq. 12, eta=0)."""
    alpha_s, sigma_s = schedule.coefficients(s, x0)
    return alpha_s * x0 + sigma_s * eps


def renoise(
    x_s: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Forward-diffuse s -> t >= s: ``sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) z``."""
    abar = schedule.alphas_cumprod.to(x_s.device)
    ratio = append_dims(abar[t.long()] / abar[s.long()], x_s.ndim).to(x_s)
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise
