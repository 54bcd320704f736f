"""The target-timestep strategy contract shared by TDD, LCM, TCD and PCM."""

from __future__ import annotations

import torch

from tdd.prediction import ddim_map
from tdd.schedule import DistillationGrid, NoiseSchedule


class TargetStrategy:
    """Chooses the target timestep s for each sample and maps predictions to it.

    ``sample(i)`` takes grid indices (t = grid[i]) and returns s per sample with
    ``0 <= s <= t_prev``. ``project`` maps a prediction (x0, eps) made at (x, t) to s; the default
    is the DDIM map. ``project_target`` does the same for the target branch, which sits at t_prev.
    """

    def __init__(self, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50):
        self.grid = DistillationGrid(num_train_timesteps, num_ddim_timesteps)

    def sample(
        self, source_index: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def project(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        x0: torch.Tensor,
        eps: torch.Tensor,
        s: torch.Tensor,
        schedule: NoiseSchedule,
    ) -> torch.Tensor:
        return ddim_map(x0, eps, s, schedule)

    def project_target(self, x_prev, t_prev, x0, eps, s, schedule: NoiseSchedule) -> torch.Tensor:
        return self.project(x_prev, t_prev, x0, eps, s, schedule)

    def _check_index(self, source_index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(source_index, dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= len(self.grid)):
            raise ValueError(f"source_index must lie in [0, {len(self.grid) - 1}]")
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={len(self.grid)}, T={self.grid.num_train_timesteps})"
