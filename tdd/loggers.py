"""Loggers that continue where a resumed run stopped: the same CSV file, the same W&B run."""

from __future__ import annotations

import csv
import secrets
import string
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` and its columns (Lightning's writer deletes it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to ``<save_dir>/<name>/metrics.csv``: a resumed run adds its
    rows to the file of the run it continues."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(LightningWandbLogger):
    """``WandbLogger`` whose run id is kept in ``<save_dir>/wandb_run_id``: a run resumed into
    its directory continues the same W&B run (``resume="allow"``)."""

    ID_FILE = "wandb_run_id"

    def __init__(self, save_dir: str = ".", id: str | None = None, **kwargs):
        super().__init__(save_dir=save_dir, id=id or run_id(Path(save_dir) / self.ID_FILE),
                         **kwargs)


def run_id(path: Path) -> str:
    """The W&B id stored at ``path``; a new one is stored there (by rank 0) when there is none."""
    if path.is_file():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new + "\n")
    return new
