"""The VP noise schedule, the distillation grid and the timesteps drawn from it
(docs/methods.md sections 0, 1 and 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: The noise schedule of Stable Diffusion 1.x / 2.x / XL as a diffusers scheduler config.
SD_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
}


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """abar[t] for t = 0..T-1 from a diffusers scheduler config (float64).

    Supports the beta schedules SD-family teachers use: ``linear``, ``scaled_linear`` and
    ``squaredcos_cap_v2``; explicit ``trained_betas`` win when present.
    """
    num = int(config.get("num_train_timesteps", 1000))
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(start, end, num, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, num, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        steps = np.arange(num)
        betas = torch.tensor(np.minimum(1 - f((steps + 1) / num) / f(steps / num), 0.999))
    else:
        raise ValueError(f"scheduler config: unsupported beta_schedule={kind!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Right-pad a per-sample vector with singleton dims so it broadcasts against ``ndim`` dims."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


class NoiseSchedule:
    """Per-timestep VP coefficients ``a_t = sqrt(abar[t])`` and ``s_t = sqrt(1 - abar[t])``."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        return cls(alphas_cumprod_from_config(config))

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(a_t, s_t) for integer timesteps ``t``, shaped and typed to broadcast with ``like``."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return tuple(append_dims(c, like.ndim).to(like) for c in (alpha, sigma))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``x_t = a_t * x0 + s_t * noise``."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise


class DistillationGrid:
    """N grid timesteps ``grid[i] = (i + 1) * k - 1`` with skip ``k = T // N``."""

    def __init__(self, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50):
        if not 1 <= num_ddim_timesteps <= num_train_timesteps:
            raise ValueError(
                f"num_ddim_timesteps={num_ddim_timesteps} must lie in [1, num_train_timesteps="
                f"{num_train_timesteps}]"
            )
        self.num_train_timesteps = num_train_timesteps
        self.size = num_ddim_timesteps
        self.skip = num_train_timesteps // num_ddim_timesteps
        self.timesteps = torch.arange(1, self.size + 1, dtype=torch.long) * self.skip - 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(index.device)[index]

    def previous(self, index: torch.Tensor) -> torch.Tensor:
        """``t_prev = max(grid[i] - k, 0)``: one teacher step below ``grid[i]``."""
        return (self[index] - self.skip).clamp(min=0)

    def sample_index(self, batch_size: int, generator: torch.Generator | None = None):
        """``i ~ U{0..N-1}`` per sample."""
        return torch.randint(0, self.size, (batch_size,), generator=generator)

    def schedule(self, num_steps: int) -> torch.Tensor:
        """The K-step schedule on the descending grid: ``grid_desc[floor(linspace(0, N, K))]``."""
        if not 1 <= num_steps <= self.size:
            raise ValueError(f"num_steps={num_steps} must lie in [1, grid size {self.size}]")
        positions = np.floor(np.linspace(0, self.size, num_steps, endpoint=False)).astype(int)
        return self.timesteps.flip(0)[torch.from_numpy(positions)]

    def tdd_candidates(self, k_min: int, k_max: int) -> torch.Tensor:
        """TDD's candidate set M (docs/methods.md 1.1): the union of the k-step schedules for k in
        [k_min, k_max], sorted, with 0 prepended and the largest (the grid top) dropped."""
        if not 1 <= k_min <= k_max <= self.size:
            raise ValueError(f"need 1 <= k_min ({k_min}) <= k_max ({k_max}) <= "
                             f"num_ddim_timesteps ({self.size})")
        union = torch.unique(torch.cat([self.schedule(k) for k in range(k_min, k_max + 1)]))
        return torch.cat([torch.zeros(1, dtype=torch.long), union[:-1]])

    def phase_edges(self, num_phases: int, setting: str = "num_phases"):
        """PCM's phases (Wang et al. 2024): edge indices ``floor(linspace(0, N, M))`` and their
        timesteps, 0 for index 0 else ``grid[e - 1]``. ``setting`` names the value in errors."""
        if not 1 <= num_phases <= self.size:
            raise ValueError(f"{setting}={num_phases} must lie in [1, num_ddim_timesteps="
                             f"{self.size}]")
        edges = np.floor(np.linspace(0, self.size, num_phases, endpoint=False))
        indices = torch.from_numpy(edges.astype(np.int64))
        timesteps = torch.where(indices == 0, 0, self[(indices - 1).clamp(min=0)])
        return indices, timesteps


def check_eta(eta: float, setting: str) -> float:
    """The gamma sampler's eta must lie in [0, 1]; ``setting`` names it in the error."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{setting}={eta} must lie in [0, 1]")
    return eta

