"""The export carries its sampler: a stock StableDiffusionPipeline with the exported LoRA, the
exported scheduler (``from_pretrained(<export>/scheduler)``) and the recorded call arguments
gives the images ``tdd.sampling.generate`` gives with the run's own sampler."""

from __future__ import annotations

import importlib
import json

import hydra
import pytest
import torch
from conftest import compose_config
from diffusers import StableDiffusionPipeline
from helpers_sampling import perturbed_lora_student

from tdd.export import export_student
from tdd.models.teacher import save_pipeline
from tdd.models.tiny import build_tiny
from tdd.sampling import generate

PROMPTS = ["a red striped circle", "a blue square at the top left"]
SEEDS = [5, 11]
STEPS = [3]  # one step count keeps this fast; every evaluated count is recorded alike


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny teacher saved as a pipeline, a LoRA student, and the stock pipeline loaded once
    with the student's exported LoRA (the same for every strategy)."""
    root = tmp_path_factory.mktemp("export_sampler")
    teacher = build_tiny()
    save_pipeline(teacher, root / "pipeline")
    student = perturbed_lora_student(teacher, rank=4, alpha=2, seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(student.export(root / "lora"))
    return pipe, teacher, student


def stock_images(pipe, export, steps: int, guidance_scale: float) -> torch.Tensor:
    record = json.loads((export / "sampling.json").read_text())
    module = importlib.import_module(record["import"].split()[1])
    scheduler_class = getattr(module, record["scheduler"])
    pipe.scheduler = scheduler_class.from_pretrained(export / "scheduler")
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, guidance_scale=guidance_scale, generator=generators, output_type="pt",
                **record["calls"][str(steps)]).images.cpu()


@pytest.mark.parametrize("strategy, guidance_scale", [
    ("tdd", 1.7), ("lcm", 1.0), ("tcd", 1.0), ("pcm", 1.0)])
def test_stock_pipeline_with_the_export_reproduces_generate(tiny, tmp_path, strategy,
                                                            guidance_scale):
    pipe, teacher, student = tiny
    cfg = compose_config([f"strategy={strategy}"], tmp_path)
    sampler = hydra.utils.instantiate(cfg.sampler)
    export_student(student, sampler, teacher.scheduler_config, tmp_path / "export",
                   steps=STEPS, guidance_scales=[guidance_scale])
    for steps in STEPS:
        expected = generate(student.unet, teacher, sampler, PROMPTS, SEEDS, steps,
                            guidance_scale, batch_size=len(PROMPTS)).images
        images = stock_images(pipe, tmp_path / "export", steps, guidance_scale)
        assert torch.allclose(images, expected, atol=1e-5), (strategy, steps)


def test_the_recorded_sampler_is_the_runs(tiny, tmp_path):
    """Grid, eta and custom timesteps travel; a default scheduler would sample differently."""
    pipe, teacher, student = tiny
    for strategy, overrides in [("tdd", ["sampler.eta=0.4", "strategy.num_ddim_timesteps=50"]),
                                ("pcm", [])]:
        cfg = compose_config([f"strategy={strategy}", *overrides], tmp_path)
        out = tmp_path / strategy
        export_student(student, hydra.utils.instantiate(cfg.sampler), teacher.scheduler_config,
                       out, steps=[4])
        config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        call = json.loads((out / "sampling.json").read_text())["calls"]["4"]
        if strategy == "tdd":
            assert config["_class_name"] == "TDDScheduler"
            assert (config["tdd_train_step"], config["eta"]) == (50, 0.4)
            assert call == {"num_inference_steps": 4, "eta": 0.4}
        else:
            assert config["_class_name"] == "TCDScheduler"
            assert config["original_inference_steps"] == 50
            assert call == {"num_inference_steps": 4, "eta": 0.0,
                            "timesteps": [999, 739, 499, 239]}
