"""PCM: the target is the lower edge of the phase that holds the source timestep."""

from __future__ import annotations

import torch

from tdd.schedule import append_dims
from tdd.strategies.base import TargetStrategy


class PCMTarget(TargetStrategy):
    """M phases with edge indices ``floor(linspace(0, N, M))`` (Wang et al. 2024, phased CM)."""

    def __init__(
        self, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50, num_phases: int = 4
    ):
        super().__init__(num_train_timesteps, num_ddim_timesteps)
        self.num_phases = num_phases
        self.edge_indices, self.edge_timesteps = self.grid.phase_edges(
            num_phases, "strategy.num_phases")

    def sample(self, source_index, generator=None):
        index = self._check_index(source_index)
        phase = torch.searchsorted(self.edge_indices, index, right=True) - 1
        return self.edge_timesteps[phase]

    def project_target(self, x_prev, t_prev, x0, eps, s, schedule):
        # When i is itself an edge, s == t_prev: the target is exactly the teacher's x_prev.
        mapped = self.project(x_prev, t_prev, x0, eps, s, schedule)
        at_edge = append_dims(s.to(t_prev.device) == t_prev, x_prev.ndim)
        return torch.where(at_edge, x_prev, mapped)
