"""The published recipes (conf/experiment) as docs/methods.md section 4 states them, the LoRA
initialisation of the released scripts, and CFG at inference with the training's uncond."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_defaults
from omegaconf import open_dict

from tdd.models.students import LoRAStudent
from tdd.models.tiny import build_tiny
from tdd.sampling import DDIMSampler, generate

# docs/methods.md section 4 (corrected 2026-12-01). w in the LCM form; global batch = per-device
# batch x devices x accumulation. lcm_full_sd15 is not in that table: diffusers' full-model
# LCM example (lr 1e-6, the "full-model value" the table mentions; weight decay 0; 12 per GPU).
# pcm_adv_sd15 is not in it either: the PCM release's adversarial SD1.5 script (2 phases, 10k
# steps, re-noising window T / 2); tdd_adv_sdxl's student weight decay 0 is its script's.
RECIPES = {
    "tdd_sdxl": dict(
        model="sdxl", resolution=1024, strategy="TDDTarget", grid=250, guidance="Decoupled",
        w=(3.5, 3.5), empty=0.2, uncond="zeros", student="LoRA", rank=64, alpha=8, lr=1e-6,
        weight_decay=None, per_device=16, devices=8, accumulation=4, global_batch=512,
        steps=100_000, loss="PseudoHuberLoss"),
    "tdd_adv_sdxl": dict(
        model="sdxl", resolution=1024, strategy="TDDTarget", grid=250, guidance="Decoupled",
        w=(3.5, 3.5), empty=0.2, uncond="zeros", student="LoRA", rank=64, alpha=8, lr=2e-6,
        weight_decay=0.0, per_device=14, devices=8, accumulation=4, global_batch=448,
        steps=100_000, loss="PseudoHuberLoss", adversarial=dict(weight=0.1, k_min=4, lr=1e-5)),
    "pcm_adv_sd15": dict(
        model="sd15", resolution=512, strategy="PCMTarget", grid=50, guidance="CFG",
        w=(4.0, 5.0), empty=0.0, uncond="empty", student="LoRA", rank=64, alpha=8, lr=5e-6,
        weight_decay=1e-3, per_device=20, devices=8, accumulation=1, global_batch=160,
        steps=10_000, loss="PseudoHuberLoss", phases=2,
        adversarial=dict(weight=0.1, k_min=2, lr=1e-5)),
    "lcm_lora_sd15": dict(
        model="sd15", resolution=512, strategy="LCMTarget", grid=50, guidance="CFG",
        w=(5.0, 15.0), empty=0.0, uncond="empty", student="LoRA", rank=64, alpha=64, lr=1e-4,
        weight_decay=0.0, per_device=12, devices=1, accumulation=1, global_batch=12,
        steps=1000, loss="PseudoHuberLoss"),
    "pcm_sd15": dict(
        model="sd15", resolution=512, strategy="PCMTarget", grid=50, guidance="CFG",
        w=(4.0, 5.0), empty=0.0, uncond="empty", student="LoRA", rank=64, alpha=8, lr=5e-6,
        weight_decay=1e-3, per_device=20, devices=8, accumulation=1, global_batch=160,
        steps=5000, loss="PseudoHuberLoss", phases=4),
    "lcm_full_sd15": dict(
        model="sd15", resolution=512, strategy="LCMTarget", grid=50, guidance="WEmbed",
        w=(3.0, 15.0), empty=0.0, uncond="empty", student="Full", lr=1e-6, weight_decay=0.0,
        per_device=12, devices=1, accumulation=1, global_batch=12, steps=1000,
        loss="PseudoHuberLoss", ema=0.95),
}


def _class(node) -> str:
    return node._target_.rsplit(".", 1)[-1]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_the_published_table(tmp_path, name):
    spec = RECIPES[name]
    cfg = compose_defaults([f"experiment={name}"], tmp_path)
    assert cfg.model.resolution == spec["resolution"]
    assert cfg.model.dual_text_encoder == (spec["model"] == "sdxl")
    assert _class(cfg.strategy) == spec["strategy"]
    assert cfg.strategy.num_ddim_timesteps == spec["grid"]
    assert cfg.strategy.get("num_phases") == spec.get("phases", cfg.strategy.get("num_phases"))
    assert _class(cfg.guidance) == spec["guidance"] + "Guidance"
    w = cfg.guidance.get("w")
    assert ((w, w) if w is not None else (cfg.guidance.w_min, cfg.guidance.w_max)) == spec["w"]
    assert cfg.guidance.get("empty_prompt_share", 0.0) == spec["empty"]
    assert cfg.guidance.get("uncond", "empty") == spec["uncond"]
    assert _class(cfg.student) == spec["student"] + "Student"
    if spec["student"] == "LoRA":
        assert (cfg.student.rank, cfg.student.alpha) == (spec["rank"], spec["alpha"])
        assert cfg.student.init_lora_weights is True  # PEFT's default initialisation
    else:
        assert cfg.student.ema_decay == spec["ema"]
    assert math.isclose(cfg.optimizer.lr, spec["lr"], rel_tol=1e-9)
    if spec["weight_decay"] is not None:
        assert cfg.optimizer.weight_decay == spec["weight_decay"]
    assert cfg.data.batch_size == spec["per_device"]
    assert cfg.trainer.devices == spec["devices"]
    assert cfg.trainer.accumulate_grad_batches == spec["accumulation"]
    batch = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches
    assert batch == spec["global_batch"]
    assert cfg.trainer.max_steps == spec["steps"]
    assert _class(cfg.loss) == spec["loss"]
    assert cfg.sampler.num_ddim_timesteps == spec["grid"]  # the sampler follows the grid
    adversarial = spec.get("adversarial")
    assert _class(cfg.adversarial) == ("HingeAdversarial" if adversarial else "NoAdversarial")
    if adversarial:  # section 1.2: hinge, weight 0.1, D AdamW betas (0, 0.999), clip 1.0
        assert (cfg.adversarial.weight, cfg.adversarial.k_min) == (adversarial["weight"],
                                                                  adversarial["k_min"])
        d_optimizer = cfg.adversarial.optimizer
        assert d_optimizer._target_ == "torch.optim.AdamW" and d_optimizer.lr == adversarial["lr"]
        assert list(d_optimizer.betas) == [0.0, 0.999]
        assert cfg.adversarial.gradient_clip_val == 1.0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_states_its_global_batch(name):
    """The comment says per-device x devices x accumulation with the numbers the config has."""
    from pathlib import Path

    spec = RECIPES[name]
    text = (Path(__file__).resolve().parents[1] / "conf" / "experiment" / f"{name}.yaml")
    expected = (f"Global batch {spec['global_batch']} = {spec['per_device']} per GPU x "
                f"{spec['devices']} GPU")
    assert expected in " ".join(text.read_text().replace("#", " ").split())


def test_debug_runs_a_recipe_on_one_process(tmp_path):
    cfg = compose_defaults(["experiment=tdd_sdxl", "debug=fdr"], tmp_path)
    assert (cfg.trainer.devices, cfg.trainer.accumulate_grad_batches) == (1, 1)


def test_lora_starts_from_peft_default_initialisation():
    """Kaiming-uniform A (bound 1/sqrt(fan_in)), zero B: the student starts as the teacher."""
    student = LoRAStudent(build_tiny().unet, rank=8, alpha=8)
    a_weights = {k: v for k, v in student.unet.state_dict().items() if "lora_A" in k}
    b_weights = [v for k, v in student.unet.state_dict().items() if "lora_B" in k]
    assert a_weights and all(torch.count_nonzero(b) == 0 for b in b_weights)
    for name, a in a_weights.items():
        fan_in = a[0].numel()
        bound = 1 / math.sqrt(fan_in)
        assert a.abs().max() <= bound + 1e-7, name
    # Uniform on [-b, b] has std b / sqrt(3); gaussian init (std 1/rank) would not fit this.
    ratios = [a.std().item() * math.sqrt(3 * a[0].numel()) for a in a_weights.values()]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.15)


def test_zeros_uncond_at_inference_equals_a_stock_sdxl_pipeline():
    """uncond=zeros: generate's CFG uses all-zero text embeddings, as SDXL pipelines do for an
    empty negative prompt (force_zeros_for_empty_prompt); the encoded "" differs."""
    from diffusers import StableDiffusionXLPipeline

    teacher, sampler = build_tiny(sdxl=True), DDIMSampler()
    text = teacher.text
    pipe = StableDiffusionXLPipeline(
        vae=teacher.vae, text_encoder=text.encoders[0], text_encoder_2=text.encoders[1],
        tokenizer=text.tokenizers[0], tokenizer_2=text.tokenizers[1], unet=teacher.unet,
        scheduler=sampler.build(teacher.scheduler_config), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    stock = pipe(prompts, num_inference_steps=3, guidance_scale=2.5, generator=generators,
                 output_type="pt", height=32, width=32).images
    zeros = generate(teacher.unet, teacher, sampler, prompts, seeds, 3, 2.5, uncond="zeros")
    empty = generate(teacher.unet, teacher, sampler, prompts, seeds, 3, 2.5)
    assert torch.allclose(zeros.images, stock, atol=1e-5)
    assert not torch.allclose(empty.images, stock, atol=1e-3)


def test_evaluation_samples_with_the_training_uncond(make_cfg, monkeypatch):
    import tdd.evaluation
    from run import train

    calls = []
    real_generate = tdd.evaluation.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("uncond"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(tdd.evaluation, "generate", spy)
    cfg = make_cfg("trainer=cpu", "trainer.max_steps=1", "callbacks=none", "logger=none",
                   "data.batch_size=2", "student.rank=2", "student.alpha=2",
                   "guidance.uncond=zeros", "evaluation.steps=[2]", "evaluation.teacher_steps=[2]",
                   "evaluation.num_images=2", "export.enabled=false")
    with open_dict(cfg):
        cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
    train(cfg)
    assert calls and set(calls) == {"zeros"}
