"""generate() and the sampler classes: seeds, guidance, NFE and every sampler on a tiny student."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler
from helpers_sampling import CallCounter, perturbed_lora_student, reference_sample
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tdd.guidance import guidance_embedding
from tdd.models.students import FullStudent
from tdd.models.tiny import SD_SCHEDULER, build_tiny
from tdd.prediction import ddim_map, to_x0_eps
from tdd.sampling import (
    LCMSampler,
    PCMSampler,
    Sampler,
    TCDSampler,
    TDDSampler,
    generate,
)
from tdd.schedule import DistillationGrid, NoiseSchedule
from tdd.schedulers import TDDScheduler

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTS = ["a red circle", "a blue striped square", "a small green triangle"]
SEEDS = [3, 1, 4]


@pytest.fixture(scope="module")
def tiny():
    teacher = build_tiny()
    return teacher, perturbed_lora_student(teacher)


def sampler_from_yaml(name: str, strategy: str | None = None) -> Sampler:
    root = {"sampler": OmegaConf.load(CONF / "sampler" / f"{name}.yaml")}
    if strategy is not None:
        root["strategy"] = OmegaConf.load(CONF / "strategy" / f"{strategy}.yaml")
    return instantiate(OmegaConf.create(root).sampler)


def test_batch_size_invariance(tiny):
    """Image k depends on its own (prompt, seed) only, not on the batch it is sampled in."""
    teacher, student = tiny
    sampler = TDDSampler(eta=0.3)
    prompts, seeds = [PROMPTS[0], PROMPTS[0]], [3, 5]
    alone = generate(student.unet, teacher, sampler, prompts, seeds, 2, 1.7, batch_size=1)
    together = generate(student.unet, teacher, sampler, prompts, seeds, 2, 1.7, batch_size=2)
    assert together.images.shape == (2, 3, 32, 32)
    assert torch.allclose(alone.images, together.images, atol=1e-5)
    # Same prompt, different seeds: different images.
    assert not torch.allclose(together.images[0], together.images[1], atol=1e-3)


@pytest.mark.parametrize("guidance_scale, passes", [(1.0, 1), (1.7, 2)])
def test_nfe_and_unet_calls(tiny, guidance_scale, passes):
    teacher, student = tiny
    counter = CallCounter(student.unet)
    try:
        result = generate(student.unet, teacher, LCMSampler(), PROMPTS[:2], SEEDS[:2], 2,
                          guidance_scale, batch_size=2)
    finally:
        counter.remove()
    assert result.nfe == 2 * passes
    # No call exceeds batch_size: with CFG, uncond and cond are a call each.
    assert counter.batches == [2] * (2 * passes)
    # ... and the images are LCM sampling with CFG written out, one UNet call per branch.
    expected = reference_sample(student.unet, teacher, PROMPTS[:2], SEEDS[:2], [999, 499], "lcm",
                                guidance_scale=guidance_scale)
    assert torch.allclose(result.images, expected, atol=1e-4)


def test_cfg_formula_at_zero_scale_is_the_empty_prompt(tiny):
    """g = 0 leaves eps(empty): the same images as the empty prompt sampled without CFG."""
    teacher, student = tiny
    sampler = TCDSampler()
    zero = generate(student.unet, teacher, sampler, PROMPTS[:2], SEEDS[:2], 2, 0.0)
    empty = generate(student.unet, teacher, sampler, ["", ""], SEEDS[:2], 2, 1.0)
    assert zero.nfe == 4 and empty.nfe == 2
    assert torch.allclose(zero.images, empty.images, atol=1e-4)
    # ... while g = 1 keeps the prompt's own prediction.
    plain = generate(student.unet, teacher, sampler, PROMPTS[:2], SEEDS[:2], 2, 1.0)
    assert not torch.allclose(plain.images, empty.images, atol=1e-3)


#: Per sampler config on an N = 50 student, 3 steps: (timesteps written out, kind, eta).
THREE_STEPS_N50 = {
    "tdd": ([999, 679, 339], "gamma", 0.2),  # grid_desc[0, 16, 33], grid[i] = 20 (i + 1) - 1
    "tcd": ([999, 679, 339], "gamma", 0.3),
    "lcm": ([999, 679, 339], "lcm", None),
    "pcm": ([999, 659, 319], "gamma", 0.0),  # the edges of 3 phases: grid[32], grid[15]
}


@pytest.mark.parametrize("name", ["tdd", "lcm", "tcd", "pcm"])
def test_every_sampler_config_runs_on_a_tiny_student(tiny, name):
    teacher, student = tiny
    sampler = sampler_from_yaml(name, strategy="tcd")  # any sampler on any student
    assert sampler.num_ddim_timesteps == 50  # the grid follows the strategy
    visited = []
    handle = student.unet.register_forward_pre_hook(
        lambda module, args: visited.append(int(args[1])))
    try:
        result = generate(student.unet, teacher, sampler, PROMPTS[:2], SEEDS[:2], 3)
    finally:
        handle.remove()
    timesteps, kind, eta = THREE_STEPS_N50[name]
    assert visited == timesteps
    assert result.images.shape == (2, 3, 32, 32) and result.nfe == 3
    expected = reference_sample(student.unet, teacher, PROMPTS[:2], SEEDS[:2], timesteps, kind,
                                eta=eta)
    assert torch.allclose(result.images, expected, atol=1e-4)


def test_generate_returns_the_clamped_decoded_latent(tiny):
    """Images are the VAE decode of the final latent, mapped to [0, 1] and clamped there."""
    teacher, student = tiny
    with torch.no_grad():
        vae = copy.deepcopy(teacher.vae)
        vae.decoder.conv_out.bias.add_(torch.tensor([3.0, -3.0, 0.0]))  # saturate two channels
    bright = dataclasses.replace(teacher, vae=vae)
    result = generate(student.unet, bright, TCDSampler(), PROMPTS[:2], SEEDS[:2], 2)
    latent = reference_sample(student.unet, bright, PROMPTS[:2], SEEDS[:2], [999, 499], "gamma",
                              eta=0.3, decode=False)
    with torch.no_grad():
        decoded = vae.decode(latent / teacher.scaling_factor).sample * 0.5 + 0.5
    assert decoded.max() > 1.5 and decoded.min() < -0.5  # the clamp has work to do
    assert torch.allclose(result.images, decoded.clamp(0, 1), atol=1e-4)


def test_sampler_configs_defaults_without_a_strategy():
    expected = {
        "tdd": (TDDSampler, TDDScheduler, 250), "lcm": (LCMSampler, LCMScheduler, 50),
        "tcd": (TCDSampler, TCDScheduler, 50), "pcm": (PCMSampler, TCDScheduler, 50),
    }
    for name, (sampler_cls, scheduler_cls, grid) in expected.items():
        sampler = sampler_from_yaml(name)
        assert type(sampler) is sampler_cls and sampler.num_ddim_timesteps == grid
        scheduler = sampler.build(SD_SCHEDULER)
        assert type(scheduler) is scheduler_cls
        assert not scheduler.config.get("clip_sample", False)
    assert sampler_from_yaml("tdd").eta == 0.2 and sampler_from_yaml("tcd").eta == 0.3
    assert sampler_from_yaml("tdd", strategy="tdd").k_max == 8


#: K-step schedules written out: grid_desc[floor(linspace(0, N, K))] with grid[i] = (i+1)*k - 1.
GRID_TABLES = {
    (50, 2): [999, 499],
    (50, 4): [999, 759, 499, 259],
    (50, 8): [999, 879, 759, 639, 499, 379, 259, 139],
    (250, 2): [999, 499],
    (250, 4): [999, 751, 499, 251],
    (250, 8): [999, 875, 751, 627, 499, 375, 251, 127],
}


@pytest.mark.parametrize(
    "sampler",
    [LCMSampler(), TCDSampler(), TDDSampler(num_ddim_timesteps=50), TDDSampler(),
     LCMSampler(num_ddim_timesteps=250), TCDSampler(num_ddim_timesteps=250)],
    ids=["lcm50", "tcd50", "tdd50", "tdd250", "lcm250", "tcd250"],
)
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_grid_samplers_use_the_distillation_grid(sampler, steps):
    scheduler = sampler.build(SD_SCHEDULER)
    sampler.set_timesteps(scheduler, steps)
    assert scheduler.timesteps.tolist() == GRID_TABLES[sampler.num_ddim_timesteps, steps]
    assert DistillationGrid(1000, sampler.num_ddim_timesteps).schedule(steps).tolist() == (
        GRID_TABLES[sampler.num_ddim_timesteps, steps])


def test_gamma_samplers_pass_eta_to_every_step():
    assert TDDSampler(eta=0.4).step_kwargs() == {"eta": 0.4}
    assert TCDSampler().step_kwargs() == {"eta": 0.3}
    assert PCMSampler().step_kwargs() == {"eta": 0.0}
    with pytest.raises(ValueError, match="eta"):
        TDDSampler(eta=1.5)
    with pytest.raises(ValueError, match="eta"):
        TCDSampler(eta=-0.1)


def test_pcm_timesteps_are_the_phase_edges():
    sampler = PCMSampler()
    assert sampler.timesteps(4) == [999, 739, 499, 239]  # not trailing DDIM 999, 749, 499, 249
    assert sampler.timesteps(1) == [999]
    assert set(sampler.timesteps(4)) <= set(sampler.timesteps(8))
    with pytest.raises(ValueError, match="num_steps"):
        sampler.timesteps(51)


def test_pcm_sampler_is_deterministic_ddim_through_the_edges():
    sampler = PCMSampler()
    scheduler = sampler.build(SD_SCHEDULER)
    sampler.set_timesteps(scheduler, 4)
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = x.double()
    timesteps = scheduler.timesteps.tolist() + [0]
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        eps = 0.5 * x
        x = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(t),
                           **sampler.step_kwargs()).prev_sample
        alpha, sigma = schedule.coefficients(torch.tensor([t]), expected)
        x0, eps64 = to_x0_eps(0.5 * expected, expected, alpha, sigma)
        expected = ddim_map(x0, eps64, torch.tensor([t_next]), schedule)
        assert torch.allclose(x.double(), expected, atol=1e-4)


def test_w_embed_student_takes_w_as_timestep_cond():
    teacher = build_tiny()
    student = FullStudent(teacher.unet, guidance_embedding_dim=256).eval()
    seen = []
    handle = student.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[0], kwargs["timestep_cond"])),
        with_kwargs=True,
    )
    try:
        result = generate(student.unet, teacher, TDDSampler(), PROMPTS[:2], SEEDS[:2], 2, 4.5)
    finally:
        handle.remove()
    assert result.nfe == 2 and len(seen) == 2
    expected = guidance_embedding(torch.full((2,), 3.5), 256)  # LCM-form w = g - 1
    for batch, timestep_cond in seen:
        assert batch == 2 and torch.allclose(timestep_cond, expected)


def test_generate_rejects_bad_arguments(tiny):
    teacher, student = tiny
    with pytest.raises(ValueError, match="seeds"):
        generate(student.unet, teacher, TDDSampler(), PROMPTS, SEEDS[:2], 2)
    with pytest.raises(ValueError, match="batch_size"):
        generate(student.unet, teacher, TDDSampler(), PROMPTS, SEEDS, 2, batch_size=0)
