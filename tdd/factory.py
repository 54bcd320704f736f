"""Config -> objects. Cheap parts are built and checked before any model is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tdd.guidance import Guidance
from tdd.models.flow import check_guidance, denoiser_config, is_flow_pipeline
from tdd.models.teacher import check_teacher_dir
from tdd.resume import check_run_config, find_resume
from tdd.strategies import TargetStrategy


@dataclass
class Recipe:
    """Everything a run needs besides the teacher and the data."""

    strategy: TargetStrategy
    guidance: Guidance
    student: Any  # partial: student(unet=..., guidance_embedding_dim=...)
    loss_fn: Any
    optimizer: Any
    lr_scheduler: Any
    adversarial: Any  # partial: adversarial(unet=...)


def _instantiate(cfg: DictConfig, key: str):
    try:
        return hydra.utils.instantiate(cfg[key])
    except hydra.errors.InstantiationException as error:  # surface the setting that failed
        raise ValueError(f"config `{key}`: {error.__cause__ or error}") from error


def build_recipe(cfg: DictConfig) -> Recipe:
    """Instantiate and cross-check the strategy, guidance, student, loss, optimizer and
    adversarial term (absent from the config of a run saved before that option existed)."""
    keys = ("strategy", "guidance", "student", "loss", "optimizer", "lr_scheduler")
    adversarial = _instantiate(cfg, "adversarial") if "adversarial" in cfg else None
    recipe = Recipe(*(_instantiate(cfg, key) for key in keys), adversarial)
    student_cls = getattr(recipe.student, "func", recipe.student)  # a partial of the class
    student_cls.check_guidance_embedding(recipe.guidance.condition_dim)
    if recipe.adversarial is not None:
        recipe.adversarial.func.check(**recipe.adversarial.keywords)
    return recipe


def check_paths(cfg: DictConfig, guidance: Guidance | None = None) -> None:
    """Fail before heavy work when a local model path is missing, or when the teacher's
    denoiser config (read, not loaded) cannot take ``guidance``."""
    if "path" in cfg.model.keys():  # `in` alone skips a missing (???) value
        path = None if OmegaConf.is_missing(cfg.model, "path") else cfg.model.path
        root = check_teacher_dir(path, "model.path")
        if guidance is not None:
            check_guidance(denoiser_config(root), guidance, f"model.path={str(path)!r}")
        if is_flow_pipeline(root) and "sampler" in cfg:  # VP-only sampler options refused now
            config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
            hydra.utils.instantiate(cfg.sampler).build_flow(config)


def resume_target(cfg: DictConfig) -> str | None:
    """The checkpoint ``ckpt_path`` names; a resume into a run directory (a run directory, or a
    file in its checkpoints/, or ``last``) also points ``paths.output_dir`` at that directory,
    after checking that the run's recipe is the one composed now (tdd.resume)."""
    resume = find_resume(cfg)
    if resume is None:
        return None
    if resume.run_dir is not None:
        check_run_config(cfg, resume.run_dir)
        cfg.paths.output_dir = str(resume.run_dir)
    return str(resume.checkpoint)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a name -> config mapping (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if entry is not None]


def finish_loggers(loggers: list) -> None:
    """Close W&B runs so the jobs of a multirun never log into each other."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
