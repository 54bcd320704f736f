"""LoRA export: a stock StableDiffusionPipeline with TDDScheduler and the exported LoRA gives the
same images as the framework's own generate()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers_sampling import perturbed_lora_student
from safetensors import safe_open

from tdd.export import export_lora, load_trainable_state
from tdd.models.students import LoRAStudent
from tdd.models.teacher import save_pipeline
from tdd.models.tiny import build_tiny
from tdd.sampling import TDDSampler, generate
from tdd.schedulers import TDDScheduler

PROMPTS = ["a red striped circle", "a blue square at the top left"]
SEEDS = [7, 2]
RANK, ALPHA = 4, 2  # scale 0.5: a loader that dropped alpha would apply it twice as strongly


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teacher = build_tiny()
    save_pipeline(teacher, root / "pipeline")  # before the adapter is added to teacher.unet
    student = perturbed_lora_student(teacher, rank=RANK, alpha=ALPHA, seed=1)
    return root, teacher, student


def pipeline(root, lora_dir=None, weight_name=None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TDDScheduler.from_config(pipe.scheduler.config, tdd_train_step=250)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    return pipe


def pipeline_images(pipe, guidance_scale: float, steps: int = 3) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale, eta=0.2,
                generator=generators, output_type="pt").images.cpu()


def lora_weights(unet) -> list[torch.Tensor]:
    return [v for k, v in sorted(unet.state_dict().items()) if "lora_" in k]


@pytest.mark.parametrize("guidance_scale", [1.0, 1.7])
def test_diffusers_export_reproduces_generate_in_a_stock_pipeline(setup, guidance_scale):
    root, teacher, student = setup
    path = export_lora(student, root / "diffusers")
    pipe = pipeline(root, root / "diffusers")
    expected = generate(student.unet, teacher, TDDSampler(eta=0.2), PROMPTS, SEEDS, 3,
                        guidance_scale, batch_size=len(PROMPTS)).images
    assert path.name == "pytorch_lora_weights.safetensors"
    assert torch.allclose(pipeline_images(pipe, guidance_scale), expected, atol=1e-5)


def test_diffusers_export_loads_every_weight_with_its_scale(setup):
    root, teacher, student = setup
    path = export_lora(student, root / "diffusers-weights")
    pipe = pipeline(root, root / "diffusers-weights")
    loaded, trained = lora_weights(pipe.unet), lora_weights(student.unet)
    assert len(loaded) == len(trained) > 0
    assert all(torch.equal(a, b) for a, b in zip(loaded, trained))
    (config,) = pipe.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["rank"] == RANK and record["alpha"] == ALPHA and record["scale"] == 0.5
    assert "time_emb_proj" in record["target_modules"]
    # The LoRA matters (so the image comparisons above can fail): it changes the UNet output.
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = teacher.text(PROMPTS[:1]).hidden
    with torch.no_grad():
        with_lora = pipe.unet(x, 499, encoder_hidden_states=hidden).sample
        pipe.disable_lora()
        without = pipe.unet(x, 499, encoder_hidden_states=hidden).sample
    assert not torch.allclose(with_lora, without, atol=1e-3)


def test_kohya_export_records_alpha_and_loads(setup):
    root, teacher, student = setup
    path = export_lora(student, root / "kohya", fmt="kohya")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
        assert f.metadata()["ss_network_alpha"] == str(ALPHA)
    assert all(k.startswith("lora_unet_") for k in keys)
    assert len(alphas) == sum(k.endswith("lora_down.weight") for k in keys) > 0
    assert all(float(a) == ALPHA for a in alphas)
    pipe = pipeline(root, root / "kohya", weight_name=path.name)
    expected = generate(student.unet, teacher, TDDSampler(eta=0.2), PROMPTS, SEEDS, 2,
                        batch_size=len(PROMPTS)).images
    assert torch.allclose(pipeline_images(pipe, 1.0, steps=2), expected, atol=1e-5)


def test_export_from_training_checkpoint(setup, tmp_path):
    root, teacher, student = setup
    # Keyed as the training module saves it: "student." + the student's trainable state.
    state = {f"student.{k}": v for k, v in student.trainable_state_dict().items()}
    assert all(k.startswith("student.unet.") for k in state)
    state["student.other.weight"] = torch.zeros(1)  # non-LoRA entries are ignored
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    fresh = LoRAStudent(build_tiny().unet, rank=RANK, alpha=ALPHA)
    assert not all(torch.equal(a, b) for a, b in
                   zip(lora_weights(fresh.unet), lora_weights(student.unet)))
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    load_trainable_state(fresh, checkpoint["state_dict"])
    path = export_lora(fresh, tmp_path / "out")
    reference = export_lora(student, tmp_path / "reference")
    with safe_open(str(path), "pt") as a, safe_open(str(reference), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_export_rejects_what_it_cannot_write(setup, tmp_path):
    root, teacher, student = setup
    with pytest.raises(ValueError, match="LoRA"):
        export_lora(build_tiny().unet, tmp_path)
    with pytest.raises(ValueError, match="format"):
        export_lora(student, tmp_path, fmt="ckpt")
    other_rank = LoRAStudent(build_tiny().unet, rank=2, alpha=2)
    state = {f"student.{k}": v for k, v in student.trainable_state_dict().items()
             if "up_blocks" not in k}
    with pytest.raises(ValueError, match="lacks"):
        load_trainable_state(other_rank, state)


def test_export_on_demand_equals_the_end_of_run_export(tmp_path):
    """``python -m tdd.export <run_dir>`` rebuilds the student from the run's config."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tdd.export import export_run

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "run.py", "model=tiny", "data=dummy", "metrics=none",
               "logger=none", "trainer=cpu", "trainer.max_steps=2", "data.batch_size=2",
               "student.rank=4", "student.alpha=4", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    at_end = load_file(next((tmp_path / "export").glob("*.safetensors")))
    on_demand = load_file(export_run(tmp_path))
    assert at_end.keys() == on_demand.keys() and len(at_end) > 0
    assert all(torch.equal(at_end[k], on_demand[k]) for k in at_end)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_run(tmp_path, checkpoint="epoch=9")
