"""The main job on tiny SD3 and FLUX teachers through the config path a user takes:
fast_dev_run for every strategy x applicable guidance x student, refusals before loading."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from helpers_flow import save_tiny_flux, save_tiny_sd3

from run import train

STRATEGIES = ["tdd", "lcm", "tcd", "pcm"]
STUDENTS = ["lora", "full"]
#: The guidance modes each teacher can apply (FLUX.1-dev is guidance-distilled).
APPLICABLE = {"sd3": ["decoupled", "cfg", "none"], "flux": ["embedded"]}
REFUSED = {"sd3": ["embedded", "w_embed"], "flux": ["decoupled", "cfg", "none", "w_embed"]}
#: One fast_dev_run stays in the fast suite (FLUX runs there in the evaluated run below).
FAST = {("sd3", "tdd", "decoupled", "lora")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_runs")
    return {"sd3": save_tiny_sd3(root / "sd3"), "flux": save_tiny_flux(root / "flux")}


def overrides(folders, model: str) -> list[str]:
    return [f"model={model}", f"model.path={folders[model]}", "model.resolution=32",
            "model.max_sequence_length=8", "model.vae_slicing=false", "debug=fdr",
            "data.batch_size=2"]


def matrix():
    for model, guidances in APPLICABLE.items():
        for strategy in STRATEGIES:
            for guidance in guidances:
                for student in STUDENTS:
                    key = (model, strategy, guidance, student)
                    marks = () if key in FAST else (pytest.mark.slow,)
                    yield pytest.param(*key, marks=marks, id="-".join(key))


@pytest.mark.parametrize("model, strategy, guidance, student", list(matrix()))
def test_fast_dev_run_on_flow_teachers(make_cfg, folders, model, strategy, guidance, student):
    cfg = make_cfg(*overrides(folders, model), f"strategy={strategy}", f"guidance={guidance}",
                   f"student={student}")
    results = train(cfg)
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    assert (Path(cfg.paths.output_dir) / "results.json").is_file()


@pytest.mark.parametrize("model, guidance", [(m, g) for m, gs in REFUSED.items() for g in gs])
def test_refused_guidance_fails_before_the_teacher_loads(make_cfg, folders, monkeypatch, model,
                                                         guidance):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the guidance was checked")

    monkeypatch.setattr("tdd.models.teacher.load_teacher", must_not_load)
    student = "full" if guidance == "w_embed" else "lora"  # LoRA + w_embed: its own error
    cfg = make_cfg(*overrides(folders, model), f"guidance={guidance}", f"student={student}")
    message = ("guidance_embeds" if guidance == "embedded" else "time_cond_proj_dim"
               if model == "sd3" else "use guidance=embedded")
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_vp_only_sampler_options_fail_before_the_teacher_loads(make_cfg, folders, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the sampler was checked")

    monkeypatch.setattr("tdd.models.teacher.load_teacher", must_not_load)
    for option in ("sampler.special_jump=true", "sampler.clip_x0=true"):
        with pytest.raises(ValueError, match="VP options"):
            train(make_cfg(*overrides(folders, "sd3"), "strategy=tdd", option))


def test_flow_model_options_need_a_path(make_cfg):
    for option in ("sd3", "flux"):
        cfg = make_cfg(f"model={option}", "debug=fdr")
        assert cfg.model._target_ == "tdd.models.teacher.load_teacher"
        with pytest.raises(ValueError, match="model.path is not set"):
            train(cfg)
    guidance = hydra.utils.instantiate(make_cfg("guidance=embedded").guidance)
    assert guidance.embeds_scale and not guidance.uses_uncond and guidance.teacher_scale == 3.5


def test_a_flux_run_is_evaluated_and_exported_for_its_pipeline(make_cfg, folders):
    """Training, evaluation (the student's TDDFlowScheduler rows beside the teacher's Euler
    row, both at the embedded scale) and the export a stock FluxPipeline reads."""
    import json

    from omegaconf import open_dict

    cfg = make_cfg(*overrides(folders, "flux")[:-2], "trainer=cpu", "trainer.max_steps=2",
                   "data.batch_size=2", "callbacks=none", "guidance=embedded",
                   "strategy.num_ddim_timesteps=50", "student.rank=4", "student.alpha=4",
                   "evaluation.steps=[2]", "evaluation.teacher_steps=[3]",
                   "evaluation.num_images=4")
    with open_dict(cfg):
        cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
    results = train(cfg)
    rows = results["metrics"]
    assert set(rows) == {"teacher3", "2_g3.5"}
    assert rows["teacher3"]["nfe"] == 3 and rows["2_g3.5"]["nfe"] == 2  # no CFG pass
    assert rows["teacher3"]["guidance_scale"] == pytest.approx(3.5)
    export = Path(results["export"]).parent
    sampling = json.loads((export / "sampling.json").read_text())
    assert sampling["scheduler"] == "TDDFlowScheduler"
    assert sampling["calls"]["2"] == {"num_inference_steps": 2}  # eta lives in the config
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert config["eta"] == 0.2 and config["use_dynamic_shifting"] is True
