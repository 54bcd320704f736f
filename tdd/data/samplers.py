"""Data order that depends only on (seed, epoch), split by rank, and a resume that continues it
mid-epoch; every training source counts what it reads and skips (:class:`DataReport`)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DistributedSampler, Sampler

from tdd.data.report import DataReport


class EpochShuffleSampler(DistributedSampler):
    """A permutation of ``range(size)`` drawn from ``seed + epoch`` (Lightning calls set_epoch),
    or ``range(size)`` itself with ``shuffle=False``, read in global batches of ``batch_size``:
    rank ``r`` of ``world_size`` takes global batches r, r + world_size, ..., so the ranks
    together read the single-process order; the tail that would leave a rank short is dropped.
    ``with_epoch`` yields ``(epoch, index)`` pairs, for sources that seed per-sample
    augmentation by epoch. Nothing is listed for an unshuffled order (the shapes stream is 2**31
    long).

    It is a ``DistributedSampler`` so that Lightning keeps it as it is under DDP (any other
    sampler is wrapped in a DistributedSamplerWrapper, which lists every index and would split a
    resumed, shortened epoch differently on each rank).

    ``skip(n)`` drops the first ``n`` indices of this rank's next pass only: a run resumed
    mid-epoch continues where the interrupted one stopped. ``len`` stays the full share, because
    Lightning's restored batch count already covers the skipped part.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, with_epoch: bool = False):
        Sampler.__init__(self)  # DistributedSampler's own setup would ask torch.distributed
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.size, self.seed, self.shuffle, self.epoch, self._skip = size, seed, shuffle, 0, 0
        self.rank, self.num_replicas, self.batch_size = rank, world_size, batch_size
        self.with_epoch, self.drop_last = with_epoch, True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator:
        start, self._skip = self._skip, 0
        b, world, rank = self.batch_size, self.num_replicas, self.rank
        positions = (((i // b) * world + rank) * b + i % b for i in range(start, len(self)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            positions = (order[p] for p in positions)
        if self.with_epoch:
            return ((self.epoch, index) for index in positions)
        return positions

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.num_replicas) * self.batch_size


class ResumableData(L.LightningDataModule):
    """A data module whose training order survives a resume: the checkpoint records how many
    training batches were drawn (by all ranks), and the next training loader skips them within
    their epoch. Exact for the same world size and batch size.

    Every drawn batch is one micro-step (``drop_last``), so the count is
    ``global_step * accumulate_grad_batches * world_size``; subclasses set ``batch_size`` and
    build their loader with :meth:`train_sampler`.

    Every training batch passes :meth:`on_before_batch_transfer` in the main process, where the
    samples read and skipped (by any loader worker: a batch may carry ``"_report"``) are counted
    into :attr:`data_report`; :meth:`report` gives the counts for results.json.
    """

    batch_size: int
    _batches_drawn = 0
    _totals: DataReport | None = None  # every rank's counts, summed at the end of a fit

    def __init__(self, max_bad_fraction: float = 0.5, min_size: int = 0):
        super().__init__()
        self.data_report = DataReport(max_bad_fraction)
        self.min_size = min_size

    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_sampler(self, size: int, seed: int, shuffle: bool,
                      with_epoch: bool = False) -> EpochShuffleSampler:
        rank, world = self.rank_and_world()
        sampler = EpochShuffleSampler(size, seed, shuffle, rank, world, self.batch_size,
                                      with_epoch)
        per_epoch = len(sampler) // self.batch_size
        drawn = self._batches_drawn // world  # this rank's share of the count
        if drawn and per_epoch:
            sampler.skip(drawn % per_epoch * self.batch_size)
        return sampler

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not (isinstance(batch, dict) and "caption" in batch):  # not a training batch
            return batch
        counts = batch.pop("_report", None) or {"seen": len(batch["caption"]), "skipped": []}
        self.data_report.update(counts["seen"], counts["skipped"])
        self.data_report.check()
        trainer = self.trainer
        if trainer is not None and trainer.loggers and self.data_report.skipped:
            if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                for logger in trainer.loggers:
                    logger.log_metrics(self.data_report.metrics(), step=trainer.global_step)
        return batch

    def teardown(self, stage: str) -> None:
        """At the normal end of a fit, on every rank: sum the ranks' counts (a collective)."""
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.state.status == "running":
            self._totals = self.data_report.gathered()

    def report(self) -> dict:
        """``{"seen": n, "skipped": {reason: n}}``: every rank's after a fit, else this one's."""
        return (self._totals or self.data_report).summary()

    def state_dict(self) -> dict:
        trainer = self.trainer
        drawn = self._batches_drawn
        if trainer is not None:
            drawn = trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size
        state = {"batches_drawn": drawn}
        report = self.data_report.gathered()  # every rank saves; rank 0's copy is written
        if report.seen:
            state["report"] = report.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._batches_drawn = int(state.get("batches_drawn", 0))
        if "report" in state and self.rank_and_world()[0] == 0:  # the totals, held once
            self.data_report.load_state_dict(state["report"])
