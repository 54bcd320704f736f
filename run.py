"""Entry point: distill a student from a teacher, evaluate it, export it, write results.json.

    python run.py strategy=tdd guidance=decoupled
    python run.py -m strategy=tdd,lcm,tcd,pcm
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import tdd.config  # noqa: F401  (registers the ${asset:...} resolver)
from tdd.callbacks import Interrupted, RunClock, StopOnSignal
from tdd.evaluation import summary_table
from tdd.export import export_student
from tdd.factory import (
    build_recipe,
    check_paths,
    finish_loggers,
    instantiate_group,
    resume_target,
)
from tdd.module import DistillationModule
from tdd.resume import resume_command


def train(cfg: DictConfig) -> dict:
    """Distill according to ``cfg`` and return the run's results (also saved as results.json)."""
    # Cheap objects first: a bad setting or path fails here, before any model is loaded.
    recipe = build_recipe(cfg)
    check_paths(cfg, recipe.guidance)
    ckpt_path = resume_target(cfg)  # a resume into a run directory writes there
    evaluation = hydra.utils.instantiate(cfg.evaluation)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    teacher = hydra.utils.instantiate(cfg.model)
    module = DistillationModule(
        teacher=teacher, student=recipe.student, strategy=recipe.strategy,
        guidance=recipe.guidance, loss_fn=recipe.loss_fn, optimizer=recipe.optimizer,
        lr_scheduler=recipe.lr_scheduler, adversarial=recipe.adversarial, seed=cfg.seed,
        **cfg.module,
    )
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    output_dir = Path(cfg.paths.output_dir)
    clock = RunClock()  # the run's time, across resumed segments
    stop = StopOnSignal(resume_command(str(output_dir)))  # SIGTERM/USR1/INT: checkpoint, exit
    callbacks = instantiate_group(cfg.get("callbacks")) + [evaluation, clock, stop]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        exported = None
        if cfg.export.enabled and trainer.is_global_zero:
            scales = evaluation.guidance_scales or recipe.guidance.inference_scales
            exported = str(export_student(module.student, evaluation.sampler,
                                          teacher.scheduler_config, output_dir / "export",
                                          cfg.export.fmt, evaluation.steps, scales))
    except SIGTERMException as error:  # Lightning's own SIGTERM stop would exit with status 0
        raise Interrupted(signal.SIGTERM) from error
    finally:
        finish_loggers(loggers)
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "train": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "metrics": evaluation.results.get("rows", {}),
        "timings": clock.timings(),
        "checkpoint": getattr(trainer.checkpoint_callback, "last_model_path", None) or None,
        "export": exported,
        "data": datamodule.report() if hasattr(datamodule, "report") else None,
    }
    if trainer.is_global_zero:  # one writer under DDP
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    if results["metrics"]:
        print(summary_table(results["metrics"]))
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    return results["train"].get("train/loss")  # the sweep objective


if __name__ == "__main__":
    main()
