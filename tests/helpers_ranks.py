"""A callback that records what each DDP rank draws and writes (for tests/test_ranks.py)."""

from __future__ import annotations

import pathlib
from pathlib import Path

import lightning as L
import torch


class RecordDraws(L.Callback):
    """Per step and rank: the target timesteps s, every noise tensor drawn, the captions; per
    rank: every file written with ``Path.write_text`` (results.json goes through it)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.steps: list[dict] = []
        self._current: dict = {}

    def setup(self, trainer, pl_module, stage):
        self.directory.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        self.draws_path = self.directory / f"draws_rank{rank}.pt"
        writes = self.directory / f"writes_rank{rank}.txt"
        write_text = pathlib.Path.write_text

        def recording_write_text(path, *args, **kwargs):
            with open(writes, "a") as log:
                log.write(f"{Path(path).name}\n")
            return write_text(path, *args, **kwargs)

        pathlib.Path.write_text = recording_write_text
        (self.directory / f"rank{rank}.started").write_text("")  # the recording works
        sample, randn_like = pl_module.strategy.sample, pl_module.randn_like

        def recording_sample(*args, **kwargs):
            self._current["s"] = sample(*args, **kwargs)
            return self._current["s"]

        def recording_randn_like(x):
            noise = randn_like(x)
            self._current.setdefault("noise", []).append(noise.cpu())
            return noise

        pl_module.strategy.sample, pl_module.randn_like = recording_sample, recording_randn_like

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._current = {"step": trainer.global_step, "captions": list(batch["caption"])}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(self._current)
        torch.save(self.steps, self.draws_path)
