"""TDD: targets drawn near the union of few-step schedules, with a stochastic offset."""

from __future__ import annotations

import torch

from tdd.strategies.base import TargetStrategy


class TDDTarget(TargetStrategy):
    """Target-driven timestep selection (Wang et al. 2024, TDD; docs/methods.md 1.1).

    Candidates M: the union of the k-step schedules for k in [k_min, k_max], with 0 prepended
    and the largest (999) dropped. Per sample, keyed on t_prev: u = max{m in M : m <= t_prev},
    tau uniform among M within [max(u - window, 0), u], then s = floor((1 - U * eta_max) * tau).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        num_ddim_timesteps: int = 250,
        k_min: int = 4,
        k_max: int = 8,
        window: int = 260,
        eta_max: float = 0.3,
    ):
        super().__init__(num_train_timesteps, num_ddim_timesteps)
        if window < 0:
            raise ValueError(f"strategy.window={window} must be >= 0")
        if not 0.0 <= eta_max <= 1.0:
            raise ValueError(f"strategy.eta_max={eta_max} must lie in [0, 1]")
        self.k_min, self.k_max, self.window, self.eta_max = k_min, k_max, window, eta_max
        self.candidates = self.grid.tdd_candidates(k_min, k_max)

    def sample(self, source_index, generator=None):
        index = self._check_index(source_index)
        t_prev = self.grid.previous(index)
        m = self.candidates
        upper = torch.searchsorted(m, t_prev, right=True) - 1  # position of u in M
        lower = torch.searchsorted(m, (m[upper] - self.window).clamp(min=0), right=False)
        count = (upper - lower + 1).to(torch.float64)
        pick = torch.rand(index.shape, generator=generator, dtype=torch.float64)
        tau = m[lower + (pick * count).long()].to(torch.float64)
        offset = torch.rand(index.shape, generator=generator, dtype=torch.float64)
        return torch.floor((1 - offset * self.eta_max) * tau).long()
