"""Evaluation after training (and every N steps): sample a grid of settings, score, log."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torchvision.utils import save_image

from tdd.distributed import RankZeroSection
from tdd.metrics.timing import SamplingCost, Stopwatch
from tdd.sampling import DDIMSampler, Sampler, generate


@dataclass(frozen=True)
class Setting:
    """One evaluated sampler setting; ``eta=None`` keeps the sampler's own default."""

    steps: int
    guidance_scale: float = 1.0
    eta: float | None = None
    teacher: bool = False

    @property
    def name(self) -> str:
        """The key suffix: ``4``, ``4_g1.7``, ``4_eta0.5``, ``teacher25``."""
        name = f"teacher{self.steps}" if self.teacher else str(self.steps)
        if self.guidance_scale != 1.0 and not self.teacher:
            name += f"_g{self.guidance_scale:g}"
        return name + ("" if self.eta is None else f"_eta{self.eta:g}")


class Evaluation(L.Callback):
    """Scores the student on a grid of (steps, guidance scale, eta) with fixed prompts and
    per-image seeds, next to the teacher's DDIM rows; logs ``val/<metric>@<setting>``.

    ``guidance_scales=None`` takes the guidance mode's own inference scales (decoupled: 1 and
    1.7). The first teacher row (25 steps by default) is the reference for ``fid_teacher``. The
    teacher's guidance scale defaults to ``1 + mean(w)`` of the run's guidance (LCM form -> the
    diffusers scale the student was distilled towards).

    Under DDP rank 0 samples and scores alone while the other ranks wait at a barrier of a
    CPU process group with a 7-day timeout (:class:`tdd.distributed.RankZeroSection`), chosen
    over sharding the sampling: FID needs every image in one place (gathering them costs as much
    memory as holding them), results stay identical whatever the number of ranks, and the wait
    holds no GPU collective open, so no NCCL timeout can fire however long scoring takes.
    """

    def __init__(
        self,
        sampler: Sampler,
        metrics,
        steps: Sequence[int] = (2, 4, 6, 8),
        guidance_scales: Sequence[float] | None = None,
        etas: Sequence[float | None] = (None,),
        teacher_steps: Sequence[int] = (25,),
        teacher_guidance_scale: float | None = None,
        num_images: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        every_n_steps: int = 0,
        grid_images: int = 16,
    ):
        if num_images < 2:
            raise ValueError(f"evaluation.num_images={num_images}: FID needs at least 2 images")
        if any(eta is not None and not hasattr(sampler, "eta") for eta in etas):
            raise ValueError(f"evaluation.etas: {type(sampler).__name__} has no eta to vary")
        self.sampler, self.metrics = sampler, metrics
        self.steps, self.guidance_scales, self.etas = list(steps), guidance_scales, list(etas)
        self.teacher_steps = list(teacher_steps)
        self.teacher_guidance_scale = teacher_guidance_scale
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.every_n_steps, self.grid_images = every_n_steps, grid_images
        self.results: dict = {}
        self._prompts: list[str] | None = None
        self._rank_zero = RankZeroSection()

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            with self._rank_zero:
                self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        with self._rank_zero:
            self.results = self.evaluate(trainer, pl_module)

    # -- the evaluation --------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, module) -> dict:
        if (not trainer.is_global_zero or trainer.fast_dev_run
                or not getattr(self.metrics, "enabled", True)):
            return {}  # like Lightning's own checkpointing, fast_dev_run skips evaluation
        self._prepare(trainer.datamodule, module)
        output = Path(trainer.default_root_dir) / "samples" / f"step{trainer.global_step}"
        rows = {}
        with module.student.as_teacher() as teacher_unet:
            for setting in self._teacher_settings(module):
                rows[setting.name] = self._score(teacher_unet, DDIMSampler(), setting, module,
                                                 output)
        scales = self.guidance_scales or module.guidance.inference_scales
        settings = [Setting(k, g, eta) for k in self.steps for g in scales for eta in self.etas]
        for setting in settings:
            sampler = self.sampler if setting.eta is None else dataclasses.replace(
                self.sampler, eta=setting.eta)
            rows[setting.name] = self._score(module.student.sampling_unet, sampler, setting,
                                             module, output)
        metrics = {f"val/{key}@{name}": value for name, row in rows.items()
                   for key, value in row.items() if isinstance(value, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if hasattr(logger, "log_image"):  # W&B: the sample grids as images
                for name, row in rows.items():
                    logger.log_image(key=f"samples/{name}", images=[row["grid"]],
                                     step=trainer.global_step)
        return {"step": trainer.global_step, "rows": rows}

    def _prepare(self, datamodule, module) -> None:
        """Fixed prompts and seeds; real-image and teacher references, computed once."""
        if self._prompts is not None:
            return
        if not hasattr(datamodule, "evaluation_set"):
            raise TypeError(f"{type(datamodule).__name__} has no evaluation_set(n): cannot "
                            "evaluate (use metrics=none for a training-only run)")
        self._prompts, real = datamodule.evaluation_set(self.num_images)
        self._seeds = [self.seed + k for k in range(len(self._prompts))]
        self.metrics.to(module.device)
        self.metrics.set_reference("real", real.to(module.device))

    def _teacher_settings(self, module) -> list[Setting]:
        scale = self.teacher_guidance_scale
        if scale is None:
            guidance = module.guidance
            scale = 1.0 + (guidance.w_min + guidance.w_max) / 2
        return [Setting(k, scale, teacher=True) for k in self.teacher_steps]

    def _score(self, unet, sampler, setting: Setting, module, output: Path) -> dict:
        with Stopwatch(module.device) as watch:
            result = generate(unet, module.teacher_info, sampler, self._prompts, self._seeds,
                              setting.steps, setting.guidance_scale, self.batch_size,
                              progress=True)
        if setting.teacher and setting.steps == self.teacher_steps[0]:
            self.metrics.set_reference("teacher", result.images.to(module.device))
        references = ["real"] if setting.teacher else None
        self.metrics.reset()
        self.metrics.update(result.images.to(module.device), self._prompts)
        row = self.metrics.compute(references)
        row.update(SamplingCost(result.nfe, watch.seconds, len(result.images)).as_dict())
        output.mkdir(parents=True, exist_ok=True)
        grid = output / f"{setting.name}.png"
        save_image(result.images[: self.grid_images], grid, nrow=4)
        row.update(steps=setting.steps, guidance_scale=setting.guidance_scale,
                   eta=setting.eta if setting.eta is not None else getattr(sampler, "eta", None),
                   teacher=setting.teacher, grid=str(grid))
        return row


def summary_table(rows: dict[str, dict]) -> str:
    """A plain-text table of every evaluated setting (what run.py prints at the end)."""
    columns = ["steps", "guidance_scale", "eta", "nfe", "fid", "fid_teacher", "clip",
               "aesthetic", "attribute_acc", "sec_per_image"]
    present = [c for c in columns if any(c in row for row in rows.values())]
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa
    lines = [["setting"] + present]
    lines += [[name] + [cell(row.get(c)) for c in present] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)
