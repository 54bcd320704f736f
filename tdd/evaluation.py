"""Evaluation after training (and every N steps): sample a grid of settings, score, log."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torchvision.utils import save_image

from tdd.distributed import RankZeroSection
from tdd.metrics.eval_sets import image_batches, load_evaluation_set
from tdd.metrics.reference_stats import reference_statistics
from tdd.metrics.timing import SamplingCost, Stopwatch
from tdd.sampling import DDIMSampler, Sampler, SampleResult, generate
from tdd.teacher_cache import CachedRow, TeacherSampleCache, weights_identity

log = logging.getLogger(__name__)

#: What a FID cell holds when the evaluation set has no reference images.
NO_REFERENCE = "not computed: no reference images"
#: At most this many images of ``evaluation.dataset`` are read for the sharpness reference.
SHARPNESS_REFERENCE_IMAGES = 2000


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

    Prompts and real reference images come from ``dataset`` (a folder, JSONL, COCO captions or
    prompts-only file: :mod:`tdd.metrics.eval_sets`) or, when it is None, from the data
    module's ``evaluation_set(n)``. Reference FID statistics of a dataset are cached in
    ``cache_dir``. A prompts-only set has no FID against real images: its rows say so.

    ``guidance_scales=None`` takes the guidance mode's own inference scales (decoupled: 1 and
    1.7). The first teacher row (25 steps by default) is the reference for ``fid_teacher``. The
    teacher's guidance scale defaults to ``1 + mean(w)`` of the run's guidance (LCM form -> the
    diffusers scale the student was distilled towards).

    Under DDP rank 0 samples and scores alone while the other ranks wait at a barrier of a
    CPU process group with a 7-day timeout (:class:`tdd.distributed.RankZeroSection`), chosen
    over sharding the sampling: FID needs every image in one place (gathering them costs as much
    memory as holding them), results stay identical whatever the number of ranks, and the wait
    holds no GPU collective open, so no NCCL timeout can fire however long scoring takes.

    ``teacher_cache_dir`` keeps the teacher rows' images between runs
    (:class:`tdd.teacher_cache.TeacherSampleCache`): a later run with the same teacher, prompts,
    seeds and settings reads them instead of sampling again (the row's ``cached`` is then True
    and its ``sec_per_image`` is the first run's). None samples them every time.

    The student samples through ``student.sampling()``: a LoRA student with its adapters merged
    into its fp32 base weights (one matmul per adapted layer instead of three; the images equal
    the unmerged ones to ~1e-6) and restored bit for bit afterwards, so evaluating during
    training leaves the training unchanged.

    Sampling runs at the trainer's precision (``trainer.precision=bf16-mixed``: under bf16
    autocast, as its training steps run); the decoded images and every score are fp32.

    ``bootstrap_draws`` > 0 adds bootstrap intervals over the generated images to every FID and
    KID (``fid_ci``, ``kid_ci``, ...), drawn with a generator seeded by ``seed`` (the same
    resampling for every setting and every run). Each evaluation also writes
    ``samples/step<k>/per_image.npz`` (the final one also ``per_image.npz`` in the run
    directory): the per-image scores of every setting (:func:`write_per_image`).
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
        dataset: str | None = None,
        cache_dir: str | None = "~/.cache/tdd/fid",
        bootstrap_draws: int = 0,
        teacher_cache_dir: str | None = None,
    ):
        self.sampler, self.metrics = sampler, metrics
        self.steps = _counts(steps, "evaluation.steps", high=sampler.num_ddim_timesteps,
                             high_name=f"the sampler's grid (num_ddim_timesteps="
                                       f"{sampler.num_ddim_timesteps})")
        self.teacher_steps = _counts(teacher_steps, "evaluation.teacher_steps", empty_ok=True,
                                     high=1000, high_name="the teacher's 1000 timesteps")
        self.guidance_scales = None if guidance_scales is None else [
            _scale(g, "evaluation.guidance_scales")
            for g in _sequence(guidance_scales, "evaluation.guidance_scales")]
        self.teacher_guidance_scale = None if teacher_guidance_scale is None else _scale(
            teacher_guidance_scale, "evaluation.teacher_guidance_scale")
        self.etas = [_eta(eta) for eta in _sequence(etas, "evaluation.etas")]
        if any(eta is not None and not hasattr(sampler, "eta") for eta in self.etas):
            raise ValueError(f"evaluation.etas: {type(sampler).__name__} has no eta to vary")
        self.num_images = _integer(num_images, "evaluation.num_images", 2, "FID needs 2 images")
        self.batch_size = _integer(batch_size, "evaluation.batch_size", 1)
        self.seed = _integer(seed, "evaluation.seed", 0)
        self.every_n_steps = _integer(every_n_steps, "evaluation.every_n_steps", 0,
                                      "0 = only at the end")
        self.grid_images = _integer(grid_images, "evaluation.grid_images", 1)
        self.bootstrap_draws = _integer(bootstrap_draws, "evaluation.bootstrap_draws", 0,
                                        "0 = no intervals")
        # Listed and checked now (before any model loads); images are read at evaluation.
        self.dataset = None if dataset is None else load_evaluation_set(
            dataset, self.num_images, self.seed)
        self.cache_dir = cache_dir
        self.teacher_cache = None if teacher_cache_dir is None else TeacherSampleCache(
            teacher_cache_dir)
        self._teacher_id: str | None = None
        self.results: dict = {}
        self.reference: dict = {}
        self._prompts: list[str] | None = None
        self._rank_zero = RankZeroSection()
        self._fid_note: str | None = None
        self._final_step: int | None = None
        self._precision = contextlib.nullcontext

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            with self._rank_zero:
                self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        with self._rank_zero:
            self.results = self.evaluate(trainer, pl_module)
            self._write_final_per_image(trainer)
        self._final_step = trainer.global_step

    def on_fit_end(self, trainer, pl_module):
        """A run resumed from a checkpoint that already reached ``trainer.max_steps`` trains
        no step, and Lightning then skips ``on_train_end``: score that checkpoint here. This is
        how a finished run (or a periodic checkpoint) is evaluated again with other settings:
        ``python run.py <its recipe> ckpt_path=<file> trainer.max_steps=<its step> ...``."""
        if self._final_step != trainer.global_step:
            with self._rank_zero:
                self.results = self.evaluate(trainer, pl_module)
                self._write_final_per_image(trainer)
            self._final_step = trainer.global_step

    def _write_final_per_image(self, trainer) -> None:
        """The final evaluation's per-image scores also as ``per_image.npz`` in the run dir."""
        if self.results.get("per_image"):
            shutil.copyfile(self.results["per_image"],
                            Path(trainer.default_root_dir) / "per_image.npz")

    # -- the evaluation --------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, module) -> dict:
        if (not trainer.is_global_zero or trainer.fast_dev_run
                or not getattr(self.metrics, "enabled", True)):
            return {}  # like Lightning's own checkpointing, fast_dev_run skips evaluation
        self._prepare(trainer.datamodule, module)
        # sampling at the training precision (bf16-mixed: under autocast); scoring in fp32
        self._precision = trainer.strategy.precision_plugin.forward_context
        self._precision_name = str(trainer.precision)
        output = Path(trainer.default_root_dir) / "samples" / f"step{trainer.global_step}"
        rows, self._per_image = {}, {}
        with module.student.as_teacher() as teacher_unet:
            for setting in self._teacher_settings(module):
                rows[setting.name] = self._score(teacher_unet, DDIMSampler(), setting, module,
                                                 output)
        scales = self.guidance_scales or module.guidance.inference_scales
        settings = [Setting(k, g, eta) for k in self.steps for g in scales for eta in self.etas]
        with module.student.sampling() as unet:
            for setting in settings:
                sampler = self.sampler if setting.eta is None else dataclasses.replace(
                    self.sampler, eta=setting.eta)
                rows[setting.name] = self._score(unet, sampler, setting, module, output)
        metrics = {f"val/{key}@{name}": value for name, row in rows.items()
                   for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if hasattr(logger, "log_image"):  # W&B: the sample grids as images
                for name, row in rows.items():
                    logger.log_image(key=f"samples/{name}", images=[row["grid"]],
                                     step=trainer.global_step)
        per_image = write_per_image(output / "per_image.npz", self._prompts, self._seeds,
                                    self._per_image)
        return {"step": trainer.global_step, "rows": rows, "per_image": str(per_image)}

    def _prepare(self, datamodule, module) -> None:
        """Fixed prompts and seeds; real-image and teacher references, computed once."""
        if self._prompts is not None:
            return
        self.metrics.to(module.device)
        if self.dataset is not None:
            self._prompts = list(self.dataset.prompts)
            self._prepare_dataset_reference(module)
        elif not hasattr(datamodule, "evaluation_set"):
            raise TypeError(f"{type(datamodule).__name__} has no evaluation_set(n): cannot "
                            "evaluate (set evaluation.dataset, or metrics=none for a "
                            "training-only run)")
        else:
            self._prompts, real = datamodule.evaluation_set(self.num_images)
            self.metrics.set_reference("real", real.to(module.device))
        self._seeds = [self.seed + k for k in range(len(self._prompts))]

    def _prepare_dataset_reference(self, module) -> None:
        """Real reference statistics of the dataset's images, from the cache when it has them;
        the sharpness reference from (at most 2000 of) the images themselves."""
        if self.dataset.has_images and hasattr(self.metrics, "set_scorer_reference"):
            sample = self.dataset.images[:SHARPNESS_REFERENCE_IMAGES]
            self.metrics.set_scorer_reference(torch.cat(list(image_batches(
                sample, module.teacher.resolution, self.batch_size))).to(module.device))
        fid = getattr(self.metrics, "fid", None)
        if fid is None:
            return
        if not self.dataset.has_images:
            self._fid_note = NO_REFERENCE
            if not self.teacher_steps:  # FID has nothing at all to compare with
                self.metrics = copy.copy(self.metrics)
                self.metrics.fid = None
            return
        stats, path, cached = reference_statistics(
            self.dataset.images, fid.feature, module.teacher.resolution, self.cache_dir,
            getattr(fid, "batch_size", self.batch_size))
        fid.set_reference_statistics(stats.mean, stats.cov, stats.num_samples, "real")
        self.reference = {"source": self.dataset.source, "images": stats.num_samples,
                          "cache": None if path is None else str(path), "cached": cached}
        log.info("FID reference statistics of %s %s %s", self.dataset.source,
                 "read from" if cached else "written to", path)

    def _teacher_settings(self, module) -> list[Setting]:
        scale = self.teacher_guidance_scale
        if scale is None:
            scale = module.guidance.teacher_scale
        return [Setting(k, scale, teacher=True) for k in self.teacher_steps]

    def _sample(self, unet, sampler, setting: Setting, module) -> tuple[SampleResult, float, bool]:
        """The setting's images, the seconds their sampling took and whether they came from
        the teacher cache (teacher rows only)."""
        key = None
        if setting.teacher and self.teacher_cache is not None:
            key = self._teacher_key(unet, sampler, setting, module)
            if (row := self.teacher_cache.load(key)) is not None:
                return SampleResult(row.images, row.nfe), row.seconds, True
        with Stopwatch(module.device) as watch, self._precision():
            result = generate(unet, module.teacher, sampler, self._prompts, self._seeds,
                              setting.steps, setting.guidance_scale, self.batch_size,
                              progress=True, uncond=module.guidance.uncond)
        if key is not None:
            self.teacher_cache.save(key, CachedRow(result.images, result.nfe, watch.seconds))
        return result, watch.seconds, False

    def _teacher_key(self, unet, sampler, setting: Setting, module) -> str:
        teacher = module.teacher
        if self._teacher_id is None:  # the teacher is frozen: hashed once per run
            networks = {"denoiser": unet, "vae": teacher.vae}
            if isinstance(teacher.text, torch.nn.Module):
                networks["text"] = teacher.text
            self._teacher_id = weights_identity(networks)
        return self.teacher_cache.key(
            self._teacher_id, self._prompts, self._seeds, steps=setting.steps,
            guidance_scale=setting.guidance_scale, uncond=module.guidance.uncond,
            batch_size=self.batch_size, sampler=repr(sampler),
            tokenizers=repr(getattr(teacher.text, "tokenizers", None)),
            scheduler=teacher.scheduler_config, resolution=teacher.resolution,
            precision=self._precision_name, device=module.device.type)

    def _score(self, unet, sampler, setting: Setting, module, output: Path) -> dict:
        result, seconds, cached = self._sample(unet, sampler, setting, module)
        if setting.teacher and setting.steps == self.teacher_steps[0]:
            self.metrics.set_reference("teacher", result.images.to(module.device))
        references = None
        if setting.teacher:  # the teacher's rows: FID vs real images only
            references = [] if self._fid_note else ["real"]
        self.metrics.reset()
        self.metrics.update(result.images.to(module.device), self._prompts)
        row = self.metrics.compute(references, self.bootstrap_draws,
                                   torch.Generator().manual_seed(self.seed))
        self._per_image.update({f"{setting.name}/{key}": values
                                for key, values in self.metrics.per_image().items()})
        if self._fid_note:
            row["fid"] = self._fid_note
        row.update(SamplingCost(result.nfe, seconds, len(result.images)).as_dict())
        if setting.teacher:
            row["cached"] = cached
        output.mkdir(parents=True, exist_ok=True)
        grid = output / f"{setting.name}.png"
        save_image(result.images[: self.grid_images], grid, nrow=4)
        row.update(steps=setting.steps, guidance_scale=setting.guidance_scale,
                   eta=setting.eta if setting.eta is not None else getattr(sampler, "eta", None),
                   teacher=setting.teacher, grid=str(grid))
        return row


def write_per_image(path: Path, prompts: Sequence[str], seeds: Sequence[int],
                    scores: dict) -> Path:
    """``per_image.npz``: ``prompts`` (str) and ``seeds`` (int64) of the evaluated images, and
    per evaluated setting and per-image score ``"<setting>/<score>"`` (float32, prompt order):
    runs evaluated with the same ``evaluation.seed`` compare image by image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: values.numpy().astype(np.float32) for key, values in scores.items()}
    np.savez_compressed(path, prompts=np.array(prompts, dtype=str),
                        seeds=np.array(seeds, dtype=np.int64), **arrays)
    return path


def read_per_image(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``per_image.npz`` (no pickled objects)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _sequence(values, setting: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{setting}={values!r} must be a list")
    return list(values)


def _integer(value, setting: str, low: int, why: str = "") -> int:
    """``value`` as an int >= ``low``, else a ValueError naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{setting}={value!r} must be an integer >= {low}{reason}")
    return int(value)


def _counts(values, setting: str, high: int, high_name: str, empty_ok: bool = False):
    """Step counts: a list of integers in [1, high]."""
    values = _sequence(values, setting)
    if not values and not empty_ok:
        raise ValueError(f"{setting} is empty: give at least one step count")
    for value in values:
        _integer(value, f"{setting}={values}: step count", 1)
        if value > high:
            raise ValueError(f"{setting}={values}: {value} steps exceed {high_name}")
    return [int(v) for v in values]


def _scale(value, setting: str) -> float:
    """A diffusers-form guidance scale: a finite number >= 0 (1 = no CFG)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{setting}: guidance scale {value!r} must be a finite number >= 0")
    return float(value)


def _eta(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"evaluation.etas: eta {value!r} must lie in [0, 1] (or null)")
    return float(value)


def summary_table(rows: dict[str, dict]) -> str:
    """A plain-text table of every evaluated setting (what run.py prints at the end); a
    metric that was not computed shows as ``n/a`` with the reason below the table."""
    columns = ["steps", "guidance_scale", "eta", "nfe", "fid", "fid_teacher", "kid", "clip",
               "aesthetic", "attribute_acc", "sharpness", "sec_per_image"]
    present = [c for c in columns if any(c in row for row in rows.values())]
    notes = {f"{c}: {row[c]}" for row in rows.values() for c in present
             if isinstance(row.get(c), str) and c not in ("steps", "guidance_scale", "eta")}

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return "n/a"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [["setting"] + present]
    lines += [[name] + [cell(row.get(c)) for c in present] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    table = [("  ".join(v.rjust(w) for v, w in zip(line, widths))) for line in lines]
    return "\n".join(table + sorted(notes))
