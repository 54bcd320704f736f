"""TCD: a target timestep drawn uniformly from 0 and the grid points up to t_prev."""

from __future__ import annotations

import torch

from tdd.strategies.base import TargetStrategy


class TCDTarget(TargetStrategy):
    """``m ~ U{0..i}``, ``s = max(grid[m] - k, 0)`` (Zheng et al. 2024, trajectory consistency)."""

    def sample(self, source_index, generator=None):
        index = self._check_index(source_index)
        u = torch.rand(index.shape, generator=generator, dtype=torch.float64)
        m = (u * (index + 1)).long()
        return (self.grid[m] - self.grid.skip).clamp(min=0)
