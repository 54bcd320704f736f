"""Model outputs to (x0, eps), the DDIM map and re-noising (docs/methods.md sections 0, 0.2, 3).

The functions take any schedule with ``coefficients`` (VP or flow): on a flow schedule the DDIM
map of a velocity prediction is exactly the Euler step ``x_t + (sigma_s - sigma_t) v``."""

from __future__ import annotations

import torch

from tdd.schedule import Schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def to_x0_eps(
    output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an epsilon / v / sample / flow prediction at ``x_t = a x0 + s eps`` to (x0, eps).

    ``flow_prediction`` is the rectified-flow velocity ``v = eps - x0`` (with ``a = 1 - s``):
    ``x0 = x_t - s v``, ``eps = x_t + a v``.
    """
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * output
        eps = sigma * x_t + alpha * output
    elif prediction_type == "sample":
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    elif prediction_type == "flow_prediction":
        x0 = x_t - sigma * output
        eps = x_t + alpha * output
    else:
        expected = ", ".join(PREDICTION_TYPES)
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {expected}")
    return x0, eps


def ddim_map(
    x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """DDIM map to timestep s: ``x_s = a_s * x0 + s_s * eps`` (Song et al. 2021, eq. 12, eta=0)."""
    alpha_s, sigma_s = schedule.coefficients(s, x0)
    return alpha_s * x0 + sigma_s * eps


def renoise(
    x_s: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Forward-diffuse s -> t >= s with fresh noise: ``scale x_s + std z`` (VP:
    ``sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) z``; flow: docs/methods.md 0.2)."""
    scale, std = schedule.transition(s, t, x_s)
    return scale * x_s + std * noise
