"""The noise schedules (VP and rectified flow), the distillation grid and the timesteps drawn
from it (docs/methods.md sections 0, 0.2, 1 and 3).

Both schedule families write ``x_t = a_t * x0 + s_t * eps`` for the integer timestep t (an index
into the teacher's T training timesteps): VP ``a_t = sqrt(abar[t])``, ``s_t = sqrt(1 - abar[t])``;
flow ``a_t = 1 - sigma[t]``, ``s_t = sigma[t]``. Everything built on ``coefficients`` (the DDIM
map, the strategies, the losses) is therefore shared.
"""

from __future__ import annotations

import math
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

    family = "vp"
    default_prediction_type = "epsilon"

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

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network takes at t: the integer t itself for VP UNets."""
        return t

    def transition(self, s: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
        """(scale, std) of the forward step s -> t >= s: ``x_t = scale x_s + std z``, with
        ``scale^2 = abar_t / abar_s`` and ``std^2 = 1 - abar_t / abar_s``."""
        abar = self.alphas_cumprod.to(like.device)
        ratio = append_dims(abar[t.long()] / abar[s.long()], like.ndim).to(like)
        return ratio.sqrt(), (1 - ratio).sqrt()


def calculate_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """FLUX's resolution-dependent shift mu: linear in the image token count between
    (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def shift_sigmas(sigmas: torch.Tensor, config: Mapping[str, Any], mu: float | None = None):
    """The teacher's sigma shift: ``shift s / (1 + (shift - 1) s)`` (SD3), or with
    ``use_dynamic_shifting`` the time shift by mu (FLUX): ``e^mu / (e^mu + 1/s - 1)``
    (``time_shift_type="exponential"``) or ``mu / (mu + 1/s - 1)`` (``"linear"``)."""
    if not config.get("use_dynamic_shifting", False):
        shift = float(config.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)
    if mu is None:
        raise ValueError("the teacher's scheduler uses dynamic shifting (use_dynamic_shifting): "
                         "its sigmas need mu, i.e. the image token count")
    kind = config.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"scheduler config: unsupported time_shift_type={kind!r}")


#: FlowMatchEulerDiscreteScheduler options that reshape the sigma table in ways not supported.
_UNSUPPORTED_FLOW = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


def flow_sigmas(config: Mapping[str, Any], mu: float | None = None) -> torch.Tensor:
    """The teacher's training sigmas by timestep index t = 0..T-1 (ascending, float64):
    ``sigma[t] = shift((t + 1) / T)``, as FlowMatchEulerDiscreteScheduler's table read from
    the noisy end backwards (docs/methods.md 0.2)."""
    bad = [key for key in _UNSUPPORTED_FLOW if config.get(key)]
    if bad:
        raise ValueError(f"flow scheduler config: {bad} are not supported")
    num = int(config.get("num_train_timesteps", 1000))
    base = torch.arange(1, num + 1, dtype=torch.float64) / num
    return shift_sigmas(base, config, mu)


class FlowSchedule:
    """Rectified flow ``x_t = (1 - sigma[t]) x0 + sigma[t] eps`` on the teacher's sigma table
    (Liu et al. 2023; Esser et al. 2024, SD3): ``a_t = 1 - sigma[t]``, ``s_t = sigma[t]``."""

    family = "flow"
    default_prediction_type = "flow_prediction"

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.to(torch.float64)
        self.num_train_timesteps = len(sigmas)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], mu: float | None = None) -> FlowSchedule:
        return cls(flow_sigmas(config, mu))

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(a_t, s_t) = (1 - sigma[t], sigma[t]), shaped and typed to broadcast with ``like``."""
        sigma = self.sigmas.to(t.device)[t.long()]
        return tuple(append_dims(c, like.ndim).to(like) for c in (1 - sigma, sigma))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = (1 - sigma_t) x0 + sigma_t noise``."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep a flow transformer takes: ``sigma[t] * T`` (float)."""
        return self.sigmas.to(t.device)[t.long()] * self.num_train_timesteps

    def transition(self, s: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
        """(scale, std) of the forward step s -> t >= s: ``scale = a_t / a_s``,
        ``std^2 = sigma_t^2 - scale^2 sigma_s^2`` (the same marginal x_t as from x0)."""
        alpha_s, sigma_s = self.coefficients(s, like)
        alpha_t, sigma_t = self.coefficients(t, like)
        scale = alpha_t / alpha_s
        return scale, (sigma_t**2 - (scale * sigma_s) ** 2).clamp(min=0).sqrt()


#: Scheduler classes whose config describes a rectified-flow teacher.
FLOW_SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                          "TDDFlowScheduler")


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a diffusers scheduler config is a rectified-flow one (by its class name)."""
    return config.get("_class_name") in FLOW_SCHEDULER_CLASSES


Schedule = NoiseSchedule | FlowSchedule


def schedule_from_config(config: Mapping[str, Any], mu: float | None = None) -> Schedule:
    """The noise schedule of a teacher's scheduler config: :class:`FlowSchedule` for the flow
    schedulers (``mu``: FLUX's resolution shift), else the VP :class:`NoiseSchedule`."""
    if is_flow_config(config):
        return FlowSchedule.from_config(config, mu)
    return NoiseSchedule.from_config(config)


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

