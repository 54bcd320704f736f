"""LCM: every sample targets s = 0 through the consistency boundary scalings."""

from __future__ import annotations

import torch

from tdd.boundary import lcm_scalings
from tdd.schedule import NoiseSchedule, append_dims
from tdd.strategies.base import TargetStrategy


class LCMTarget(TargetStrategy):
    """Target timestep 0; ``f = c_skip(t) * x_t + c_out(t) * x0_hat`` (Luo et al. 2023)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        num_ddim_timesteps: int = 50,
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
    ):
        super().__init__(num_train_timesteps, num_ddim_timesteps)
        if sigma_data <= 0 or timestep_scaling <= 0:
            raise ValueError("strategy: sigma_data and timestep_scaling must be positive")
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling

    def sample(self, source_index, generator=None):
        return torch.zeros_like(self._check_index(source_index))

    def project(self, x, t, x0, eps, s, schedule: NoiseSchedule):
        c_skip, c_out = lcm_scalings(t, self.sigma_data, self.timestep_scaling)
        c_skip, c_out = (append_dims(c, x.ndim).to(x) for c in (c_skip, c_out))
        return c_skip * x + c_out * x0
