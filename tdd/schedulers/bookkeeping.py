"""The step bookkeeping of the diffusers scheduler contract, shared by the VP and flow gamma
schedulers: where in ``timesteps`` the next ``step`` is, and img2img's begin index."""

from __future__ import annotations

import torch


class StepBookkeeping:
    """``step_index`` / ``begin_index`` as diffusers pipelines read and set them. The class
    using it holds ``timesteps`` and ``config.num_train_timesteps``; ``set_timesteps`` calls
    :meth:`reset_steps`, ``step`` calls :meth:`advance` for the index of its timestep."""

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index of ``timesteps`` (img2img pipelines skip the first steps)."""
        self._begin_index = begin_index

    def reset_steps(self) -> None:
        self._step_index = self._begin_index = None

    def advance(self, timestep) -> int:
        """The index of the step being taken at ``timestep`` (the first step: that timestep's
        place in the schedule, or the begin index); the next step takes the one after it."""
        if self._step_index is None:
            self._step_index = (self.index_for_timestep(timestep) if self._begin_index is None
                                else self._begin_index)
        index = self._step_index
        self._step_index += 1
        return index

    def index_for_timestep(self, timestep) -> int:
        """The first place of ``timestep`` in the schedule (integer VP timesteps match exactly,
        a flow schedule's float ones to within 1e-3)."""
        distance = (self.timesteps.cpu().double() - float(timestep)).abs()
        index = int(distance.argmin())
        if distance[index] > 1e-3:
            raise ValueError(f"timestep {float(timestep):g} is not in the schedule "
                             f"{self.timesteps.tolist()}")
        return index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """These samplers feed the model ``x_t`` unscaled."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
