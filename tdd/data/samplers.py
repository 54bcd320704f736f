"""Data order that depends only on (seed, epoch), and a resume that continues it mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``seed + epoch`` (Lightning calls set_epoch),
    or ``range(size)`` itself with ``shuffle=False``.

    ``skip(n)`` drops the first ``n`` indices of the next pass only: a run resumed mid-epoch
    continues where the interrupted one stopped. ``len`` stays the full epoch, because
    Lightning's restored batch count already covers the skipped part.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch, self._skip = size, seed, shuffle, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        if not self.shuffle:
            return iter(range(start, self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[start:].tolist())

    def __len__(self) -> int:
        return self.size


class ResumableData(L.LightningDataModule):
    """A data module whose training order survives a resume: the checkpoint records how many
    training batches were drawn, and the next training loader skips them within their epoch.

    Every drawn batch is one micro-step (``drop_last``), so the count is
    ``global_step * accumulate_grad_batches * world_size``; subclasses set ``batch_size`` and
    build their loader with :meth:`train_sampler`.
    """

    batch_size: int
    _batches_drawn = 0

    def train_sampler(self, size: int, seed: int, shuffle: bool) -> EpochShuffleSampler:
        sampler = EpochShuffleSampler(size, seed, shuffle)
        per_epoch = size // self.batch_size
        if self._batches_drawn and per_epoch:
            sampler.skip(self._batches_drawn % per_epoch * self.batch_size)
        return sampler

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {"batches_drawn": self._batches_drawn}
        drawn = trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size
        return {"batches_drawn": drawn}

    def load_state_dict(self, state: dict) -> None:
        self._batches_drawn = int(state.get("batches_drawn", 0))
