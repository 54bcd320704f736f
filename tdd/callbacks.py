"""Training callbacks for long runs: safe checkpoints, stopping on signals, progress, timing."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for resuming: one ``last.ckpt`` per run, always the newest.

    Files are written to ``<name>.partial`` and renamed, so a kill mid-write never leaves a
    truncated ``last.ckpt``; ``last.ckpt`` is overwritten (never ``last-v1.ckpt``); the end of
    training always saves it; a state with non-finite trainable weights is never saved.
    Periodic files are named ``step000300.ckpt`` (``ckpt_path=<file>`` works as typed).
    """

    def __init__(self, filename: str = "step{step:06d}", **kwargs):
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(filename=filename, **kwargs)
        self.last_saved_step: int | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        if not all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad):
            rank_zero_warn(f"step {trainer.global_step}: trainable weights are not finite, "
                           f"{filepath} is not written")
            return
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath
        self.last_saved_step = trainer.global_step

    def save_now(self, trainer: L.Trainer) -> str | None:
        """Write ``last.ckpt`` for the current step (unless already written); its path."""
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        path = self.last_model_path
        return path if path and Path(path).is_file() else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not trainer.fast_dev_run:
            self.save_now(trainer)


class StopOnSignal(L.Callback):
    """SIGTERM, SIGUSR1 (cluster preemption) and SIGINT stop training after the current step
    with a checkpoint and exit status 128 + signal number; the message says how to resume.

    A second SIGINT interrupts at once (no checkpoint). Under DDP every rank stops at the same
    step (any rank that got a signal stops all). SIGUSR1 handlers set before (Lightning's SLURM
    auto-requeue) still run.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, resume_command: str = ""):
        self.resume_command = resume_command
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if sys.platform == "win32":
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                return

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum
        previous = self._previous.get(signum)
        if signum == signal.SIGUSR1 and callable(previous):
            previous(signum, frame)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            raise Interrupted(self.received or signal.SIGTERM)

    def on_train_end(self, trainer, pl_module) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (Interrupted, SIGTERMException)):
            return
        self.on_train_end(trainer, pl_module)
        name = signal.Signals(getattr(exception, "signum", signal.SIGTERM)).name
        callback = trainer.checkpoint_callback
        if isinstance(callback, Checkpoint):
            path = callback.save_now(trainer)
        else:
            path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path)
        command = self.resume_command or f"python run.py <same overrides> ckpt_path={path}"
        saved = f"checkpoint {path}" if path else "no checkpoint written (non-finite weights)"
        if trainer.is_global_zero:
            print(f"{name}: stopped at step {trainer.global_step}, {saved}\n"
                  f"resume with: {command}", flush=True)


class Interrupted(SystemExit):
    """Training stopped by a signal; exits with status 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class ProgressLog(L.Callback):
    """One line every ``every_n_steps`` steps: step, loss, it/s and ETA, for logs and clusters.

    ``only_without_terminal``: stay quiet when stdout is a terminal (the progress bar shows it).
    """

    def __init__(self, every_n_steps: int = 50, only_without_terminal: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.progress.every_n_steps={every_n_steps}: must be >= 1")
        self.every_n_steps, self.only_without_terminal = every_n_steps, only_without_terminal
        self._start: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero or self._start is None:
            return
        if self.only_without_terminal and sys.stdout.isatty():
            return
        seconds, first = time.perf_counter() - self._start[0], self._start[1]
        rate = (step - first) / max(seconds, 1e-9)
        total = trainer.max_steps if trainer.max_steps > 0 else None
        eta = f"{(total - step) / rate / 60:.1f} min" if total and rate > 0 else "?"
        loss = trainer.callback_metrics.get("train/loss")
        loss = f"{float(loss):.4f}" if loss is not None else "?"
        print(f"step {step}/{total or '?'}  loss {loss}  {rate:.2f} it/s  ETA {eta}", flush=True)


class RunClock(L.Callback):
    """Wall time of a run across resumed segments: earlier segments travel in the checkpoint,
    so ``timings()`` gives the whole run's time and ``segments()`` each part."""

    def __init__(self):
        self.start = time.perf_counter()
        self.earlier: list[dict] = []  # {"steps": [first, last], "seconds": s} per segment
        self.first_step = 0
        self._trainer: L.Trainer | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step

    def segments(self) -> list[dict]:
        step = self._trainer.global_step if self._trainer is not None else self.first_step
        now = {"steps": [self.first_step, step], "seconds": time.perf_counter() - self.start}
        return self.earlier + [now]

    def timings(self) -> dict:
        """results.json's ``timings``: segments and their sum from one clock reading."""
        segments = self.segments()
        return {"seconds": sum(segment["seconds"] for segment in segments),
                "segments": segments, "global_step": segments[-1]["steps"][1]}

    def state_dict(self) -> dict:
        return {"segments": self.segments()}

    def load_state_dict(self, state: dict) -> None:
        self.earlier = list(state.get("segments", []))
