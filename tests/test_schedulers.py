"""TDDScheduler: the diffusers scheduler contract and the gamma sampler (docs/methods.md 3)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    TCDScheduler,
)

from tdd.models.tiny import SD_SCHEDULER
from tdd.schedulers import TDDScheduler
from tdd.schedulers.tdd_scheduler import PUBLISHED_SCHEDULES

# docs/methods.md 1.1: the candidate sets M (0 prepended, 999 dropped).
M_250 = [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627, 667, 715, 751,
         799, 835, 859, 875]
M_50 = [0, 139, 159, 179, 199, 259, 299, 339, 379, 399, 439, 499, 579, 599, 639, 679, 719, 759,
        799, 839, 859, 879]

SOURCE_CONFIGS = {
    "ddpm": lambda: DDPMScheduler.from_config(SD_SCHEDULER).config,
    "ddim": lambda: DDIMScheduler.from_config(SD_SCHEDULER).config,
    "euler": lambda: EulerDiscreteScheduler.from_config(SD_SCHEDULER).config,
    # Explicit values: diffusers' from_config drops the keys a config left at its defaults.
    "ddpm-linear-v": lambda: DDPMScheduler(beta_schedule="linear", beta_start=1e-4,
                                           beta_end=0.02, prediction_type="v_prediction").config,
}


def make(**overrides) -> TDDScheduler:
    return TDDScheduler.from_config(SD_SCHEDULER, **overrides)


def latents(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def tame_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth stand-in for a UNet: eps roughly the unit-variance part of x."""
    return 0.8 * x / x.std() + 0.01 * t / 1000


def run_chain(scheduler, x, **step_kwargs):
    for t in scheduler.timesteps:
        x = scheduler.step(tame_model(x, int(t)), t, x, **step_kwargs).prev_sample
    return x


def abar(t: int) -> float:
    """abar[t] of the SD schedule, written out independently of tdd.schedule."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[t])


# --- the diffusers contract -------------------------------------------------------------------

@pytest.mark.parametrize("source", sorted(SOURCE_CONFIGS))
def test_from_config_of_teacher_schedulers(source):
    config = SOURCE_CONFIGS[source]()
    scheduler = TDDScheduler.from_config(config)
    reference = DDIMScheduler.from_config(config)
    assert scheduler.config.prediction_type == config["prediction_type"]
    assert scheduler.config.beta_schedule == config["beta_schedule"]
    assert torch.allclose(scheduler.alphas_cumprod.float(), reference.alphas_cumprod, atol=1e-6)
    assert scheduler.config.tdd_train_step == 250 and scheduler.config.eta == 0.2
    # ... and back: a stock scheduler accepts the TDD config.
    back = DDIMScheduler.from_config(scheduler.config)
    assert torch.allclose(back.alphas_cumprod, reference.alphas_cumprod)


def test_from_config_overrides_and_pipeline_swap_keys():
    scheduler = TDDScheduler.from_config(DDIMScheduler.from_config(SD_SCHEDULER).config,
                                         tdd_train_step=50, eta=0.5, special_jump=True)
    assert (scheduler.config.tdd_train_step, scheduler.config.eta) == (50, 0.5)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def test_save_config_from_pretrained_round_trip(tmp_path):
    scheduler = make(tdd_train_step=50, eta=0.35, clip_x0=True, clip_steps=2, k_max=7,
                     prediction_type="v_prediction")
    scheduler.save_config(tmp_path)
    loaded = TDDScheduler.from_pretrained(tmp_path)
    keys = inspect.signature(TDDScheduler.__init__).parameters.keys() - {"self"}
    assert {k: loaded.config[k] for k in keys} == {k: scheduler.config[k] for k in keys}
    for s in (scheduler, loaded):
        s.set_timesteps(6)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)


def test_step_signature_names_are_api():
    step = inspect.signature(TDDScheduler.step).parameters
    assert {"eta", "generator", "return_dict"} <= step.keys()
    assert step["eta"].default is None and step["generator"].default is None
    assert {"num_inference_steps", "device", "timesteps"} <= set(
        inspect.signature(TDDScheduler.set_timesteps).parameters)


def test_tuple_and_dict_outputs_agree():
    x = latents(0)
    outputs = []
    for return_dict in (True, False):
        scheduler = make()
        scheduler.set_timesteps(4)
        out = scheduler.step(tame_model(x, 999), 999, x, eta=0.3,
                             generator=torch.Generator().manual_seed(1), return_dict=return_dict)
        outputs.append((out.prev_sample, out.denoised) if return_dict else out)
    assert isinstance(outputs[1], tuple) and len(outputs[1]) == 2
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_scheduler_basics():
    scheduler = make()
    x = latents(0)
    assert len(scheduler) == 1000 and scheduler.order == 1 and scheduler.init_noise_sigma == 1.0
    assert scheduler.scale_model_input(x, 999) is x
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(4, timesteps=[999, 499])
    with pytest.raises(ValueError, match="eta"):
        make(eta=1.5)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="eta"):
        scheduler.step(x, 999, x, eta=-0.1)
    with pytest.raises(ValueError, match="prediction_type"):
        make(prediction_type="flow")


# --- timesteps ----------------------------------------------------------------------------

def expected_schedule(n: int, k: int) -> list[int]:
    """grid_desc[floor(j N / K)], grid[i] = (i + 1) * (1000 // N) - 1, in integer arithmetic."""
    skip = 1000 // n
    return [(n - (j * n) // k) * skip - 1 for j in range(k)]


@pytest.mark.parametrize("n", [250, 50])
@pytest.mark.parametrize("k", [4, 5, 6, 7, 8])
def test_equidistant_tables_follow_the_formula(n, k):
    scheduler = make(tdd_train_step=n)
    scheduler.set_timesteps(k)
    assert scheduler.timesteps.dtype == torch.long
    assert scheduler.timesteps.tolist() == expected_schedule(n, k)
    assert set(scheduler.timesteps.tolist()) <= set(scheduler.trained_timesteps.tolist())


def test_published_tables():
    pins = {
        (250, 4): [999, 751, 499, 251],
        (250, 8): [999, 875, 751, 627, 499, 375, 251, 127],
        (50, 4): [999, 759, 499, 259],
        (50, 8): [999, 879, 759, 639, 499, 379, 259, 139],
    }
    for (n, k), table in pins.items():
        scheduler = make(tdd_train_step=n)
        scheduler.set_timesteps(k)
        assert scheduler.timesteps.tolist() == table


def test_special_jump_schedules():
    published = {5: [999, 875, 751, 499, 251], 6: [999, 875, 751, 627, 499, 251],
                 7: [999, 875, 751, 627, 499, 375, 251]}
    jump, plain = make(special_jump=True), make()
    for k in range(4, 9):
        jump.set_timesteps(k)
        plain.set_timesteps(k)
        expected = published.get(k, expected_schedule(250, k))
        assert jump.timesteps.tolist() == expected
        assert set(expected) <= set(jump.trained_timesteps.tolist())
    assert plain.timesteps.tolist() == expected_schedule(250, 8)
    # The published schedules exist for N = 250 only; other grids stay equidistant.
    fifty = make(tdd_train_step=50, special_jump=True)
    fifty.set_timesteps(5)
    assert fifty.timesteps.tolist() == expected_schedule(50, 5)
    assert set(PUBLISHED_SCHEDULES) == {(250, 5), (250, 6), (250, 7)}


@pytest.mark.parametrize("n, m", [(250, M_250), (50, M_50)])
def test_trained_timesteps_are_m_and_999(n, m):
    assert make(tdd_train_step=n).trained_timesteps.tolist() == m + [999]


def test_custom_timesteps():
    scheduler = make()
    scheduler.set_timesteps(timesteps=[999, 875, 499, 127], device="cpu")
    assert scheduler.timesteps.tolist() == [999, 875, 499, 127]
    assert scheduler.num_inference_steps == 4
    with pytest.raises(ValueError, match="750"):
        scheduler.set_timesteps(timesteps=[999, 750, 499])
    with pytest.raises(ValueError, match="descending"):
        scheduler.set_timesteps(timesteps=[999, 499, 751])
    # 259 is trained on the 50 grid, not on the 250 grid.
    with pytest.raises(ValueError, match="259"):
        scheduler.set_timesteps(timesteps=[999, 499, 259])
    make(tdd_train_step=50).set_timesteps(timesteps=[999, 499, 259])


# --- the gamma sampler ------------------------------------------------------------------------

def test_one_step_is_the_written_out_gamma_step():
    eta, x = 0.3, latents(1)
    scheduler = make()
    scheduler.set_timesteps(4)  # 999, 751, 499, 251
    eps = tame_model(x, 999)
    out = scheduler.step(eps, 999, x, eta=eta, generator=torch.Generator().manual_seed(5))
    t, t_next = 999, 751
    s = math.floor((1 - eta) * t_next)
    x0 = (x.double() - math.sqrt(1 - abar(t)) * eps.double()) / math.sqrt(abar(t))
    x_s = math.sqrt(abar(s)) * x0 + math.sqrt(1 - abar(s)) * eps.double()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).double()
    ratio = abar(t_next) / abar(s)
    expected = math.sqrt(ratio) * x_s + math.sqrt(1 - ratio) * z
    assert torch.allclose(out.prev_sample.double(), expected, atol=1e-5)
    assert torch.allclose(out.denoised.double(), x0, atol=1e-4)


def test_last_step_is_the_ddim_map_to_abar0_without_noise():
    x = latents(2)
    scheduler = make()
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(3)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    eps = tame_model(x, 251)
    out = scheduler.step(eps, 251, x, eta=0.7, generator=generator)
    assert torch.equal(generator.get_state(), state)  # no noise drawn
    x0 = (x.double() - math.sqrt(1 - abar(251)) * eps.double()) / math.sqrt(abar(251))
    expected = math.sqrt(abar(0)) * x0 + math.sqrt(1 - abar(0)) * eps.double()
    assert torch.allclose(out.prev_sample.double(), expected, atol=1e-5)
    assert torch.allclose(out.denoised.double(), x0, atol=1e-4)


@pytest.mark.parametrize("n, k", [(8, 4), (8, 8), (1000, 10)])
def test_eta_zero_equals_ddim(n, k):
    """eta = 0 is DDIM on the same timesteps. DDIM steps by T // K, so the grid must be the one
    its "trailing" spacing lands on; ``set_alpha_to_one=False`` makes its last step use abar[0]."""
    ours = make(tdd_train_step=n, k_max=min(8, n))
    ours.set_timesteps(k)
    ddim = DDIMScheduler.from_config(SD_SCHEDULER, timestep_spacing="trailing",
                                     set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(k)
    assert ours.timesteps.tolist() == ddim.timesteps.tolist()
    # Same abar in both (diffusers keeps float32 cumprods) so only the formulas are compared.
    ddim.alphas_cumprod = ours.alphas_cumprod.float()
    ddim.final_alpha_cumprod = ddim.alphas_cumprod[0]
    x = latents(3)
    a = run_chain(ours, x, eta=0.0)
    assert torch.allclose(a, run_chain(ddim, x, eta=0.0), atol=1e-5)
    # With set_alpha_to_one=True DDIM ends at abar = 1 instead: a different final sample.
    ddim_one = DDIMScheduler.from_config(SD_SCHEDULER, timestep_spacing="trailing",
                                         set_alpha_to_one=True, clip_sample=False)
    ddim_one.set_timesteps(k)
    assert not torch.allclose(a, run_chain(ddim_one, x, eta=0.0), atol=1e-3)


def test_eta_zero_is_deterministic_and_ignores_the_generator():
    x = latents(4)
    runs = []
    for seed in (0, 1):
        scheduler = make()
        scheduler.set_timesteps(6)
        generator = torch.Generator().manual_seed(seed)
        runs.append(run_chain(scheduler, x, eta=0.0, generator=generator))
    assert torch.equal(*runs)


def test_eta_positive_is_reproducible_and_differs_from_eta_zero():
    x = latents(5)

    def sample(eta, seed):
        scheduler = make()
        scheduler.set_timesteps(4)
        return run_chain(scheduler, x, eta=eta, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0.2, 7), sample(0.2, 7))
    assert not torch.allclose(sample(0.2, 7), sample(0.2, 8), atol=1e-3)
    assert not torch.allclose(sample(0.2, 7), sample(0.0, 7), atol=1e-3)


def test_config_eta_is_used_when_step_gets_none():
    x = latents(6)
    runs = []
    for scheduler, eta in ((make(eta=0.5), None), (make(), 0.5)):
        scheduler.set_timesteps(4)
        runs.append(run_chain(scheduler, x, eta=eta, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(*runs)


def test_gamma_sampler_equals_diffusers_tcd():
    """The same sampler as diffusers' TCDScheduler on the same grid, noise and abar."""
    ours = make(tdd_train_step=250)
    ours.set_timesteps(6)
    tcd = TCDScheduler.from_config(SD_SCHEDULER, original_inference_steps=250)
    tcd.set_timesteps(6)
    tcd.alphas_cumprod = ours.alphas_cumprod.float()
    assert ours.timesteps.tolist() == tcd.timesteps.tolist()
    x = latents(7)
    a = run_chain(ours, x, eta=0.3, generator=torch.Generator().manual_seed(3))
    b = run_chain(tcd, x, eta=0.3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-5)


def test_per_sample_generators_make_steps_batch_invariant():
    """With one generator per sample, a sample's trajectory ignores the rest of its batch."""
    x, seeds = latents(8, batch=3), [11, 12, 13]
    scheduler = make()

    def chain(xs, generators):
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps:  # a per-sample model, so only the noise could couple
            xs = scheduler.step(0.5 * xs, t, xs, eta=0.4, generator=generators).prev_sample
        return xs

    together = chain(x, [torch.Generator().manual_seed(s) for s in seeds])
    for i, seed in enumerate(seeds):
        alone = chain(x[i : i + 1], [torch.Generator().manual_seed(seed)])
        assert torch.allclose(alone, together[i : i + 1], atol=1e-6)
    shared = chain(x, torch.Generator().manual_seed(11))  # one generator: batch-drawn noise
    assert not torch.allclose(shared[1:], together[1:], atol=1e-3)


def test_x0_clipping_changes_only_the_first_clip_steps_steps():
    x = 3.0 * latents(9)  # x0 predictions far outside [-1, 1]
    eps = 0.1 * latents(10)
    clipped, plain = make(clip_x0=True, clip_steps=2), make()
    for scheduler in (clipped, plain):
        scheduler.set_timesteps(4)
    for i, t in enumerate(clipped.timesteps):
        a = clipped.step(eps, t, x, eta=0.0)
        b = plain.step(eps, t, x, eta=0.0)
        if i < 2:
            assert a.denoised.abs().max() <= 1.0 < b.denoised.abs().max()
            assert not torch.allclose(a.prev_sample, b.prev_sample)
        else:
            assert torch.equal(a.prev_sample, b.prev_sample)
            assert torch.equal(a.denoised, b.denoised)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_agree_with_epsilon(prediction_type):
    x0, eps = latents(11).clamp(-1, 1), latents(12)
    t = 751
    a, s = math.sqrt(abar(t)), math.sqrt(1 - abar(t))
    x_t = a * x0 + s * eps
    output = {"v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    results = []
    for kind, out in (("epsilon", eps), (prediction_type, output)):
        scheduler = make(prediction_type=kind)
        scheduler.set_timesteps(4)
        scheduler.set_begin_index(1)
        results.append(scheduler.step(out, t, x_t, eta=0.0))
    assert torch.allclose(results[0].prev_sample, results[1].prev_sample, atol=1e-5)
    assert torch.allclose(results[1].denoised, x0, atol=1e-5)


def test_add_noise_and_img2img_start():
    scheduler = make()
    x0, noise = latents(13), latents(14)
    t = torch.tensor([499, 251])
    noisy = scheduler.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(abar(ti)) * x0[i] + math.sqrt(1 - abar(ti)) * noise[i]
        assert torch.allclose(noisy[i], expected.float(), atol=1e-6)
    # img2img: start at the third timestep, found from the timestep itself.
    scheduler.set_timesteps(4)
    out = scheduler.step(tame_model(noisy, 499), 499, noisy, eta=0.0)
    assert scheduler.step_index == 3 and out.prev_sample.shape == noisy.shape
    with pytest.raises(ValueError, match="500"):
        scheduler.set_timesteps(4)
        scheduler.step(noisy, 500, noisy)


def test_pipeline_default_eta_zero_is_flagged_once(monkeypatch):
    """Stock pipelines pass eta=0.0 unless told: the scheduler says so once per schedule."""
    import tdd.schedulers.tdd_scheduler as module

    messages = []
    monkeypatch.setattr(module.logger, "warning", messages.append)
    x = latents(15)
    scheduler = make()
    scheduler.set_timesteps(4)
    run_chain(scheduler, x, eta=0.0)
    assert len(messages) == 1 and "eta" in messages[0]
    scheduler.set_timesteps(4)
    run_chain(scheduler, x, eta=0.2, generator=torch.Generator().manual_seed(0))
    quiet = make(eta=0.0)
    quiet.set_timesteps(4)
    run_chain(quiet, x, eta=0.0)
    assert len(messages) == 1


# --- inside stock diffusers pipelines ---------------------------------------------------------

def gamma_loop(unet_eps, x, timesteps: list[int], eta: float, generator) -> torch.Tensor:
    """The gamma sampler written out (docs/methods.md section 3), noise from ``generator``."""
    for step, t in enumerate(timesteps):
        eps = unet_eps(x, t)
        x0 = (x - math.sqrt(1 - abar(t)) * eps) / math.sqrt(abar(t))
        last = step == len(timesteps) - 1
        t_next = 0 if last else timesteps[step + 1]
        s = math.floor((1 - eta) * t_next)
        x = math.sqrt(abar(s)) * x0 + math.sqrt(1 - abar(s)) * eps
        if not last and s < t_next:
            ratio = abar(t_next) / abar(s)
            noise = torch.randn(x.shape, generator=generator)
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise
    return x


class TimestepRecorder:
    def __init__(self, unet):
        self.seen: list[int] = []
        self.handle = unet.register_forward_pre_hook(
            lambda module, args: self.seen.append(int(args[1])))


@torch.no_grad()
def test_inside_the_sdxl_pipeline():
    """``pipe.scheduler = TDDScheduler.from_config(...)`` in StableDiffusionXLPipeline: the
    4-step table of N = 250 and the written-out gamma sampler, eta passed by the caller."""
    from diffusers import StableDiffusionXLPipeline

    from tdd.models.tiny import build_tiny

    teacher = build_tiny(sdxl=True)
    pipe = StableDiffusionXLPipeline(
        vae=teacher.vae, text_encoder=teacher.text.encoders[0],
        text_encoder_2=teacher.text.encoders[1], tokenizer=teacher.text.tokenizers[0],
        tokenizer_2=teacher.text.tokenizers[1], unet=teacher.unet,
        scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULER),
    )
    pipe.scheduler = TDDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    recorder = TimestepRecorder(pipe.unet)
    out = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, eta=0.3,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    recorder.handle.remove()
    assert recorder.seen == [999, 751, 499, 251]
    assert pipe.scheduler.timesteps.tolist() == [999, 751, 499, 251]
    hidden, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    expected = gamma_loop(
        lambda x, t: teacher.unet(x, t, encoder_hidden_states=hidden,
                                  added_cond_kwargs=added).sample,
        x, [999, 751, 499, 251], 0.3, g,
    )
    assert torch.allclose(out, expected, atol=1e-4)


@torch.no_grad()
def test_inside_the_img2img_pipeline():
    """StableDiffusionImg2ImgPipeline with strength 0.5 starts the 4-step table at its third
    timestep: VAE sample, add_noise to 499, then the written-out gamma steps 499 -> 251 -> 0."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from tdd.models.tiny import build_tiny

    teacher = build_tiny()
    pipe = StableDiffusionImg2ImgPipeline(
        vae=teacher.vae, text_encoder=teacher.text.encoders[0],
        tokenizer=teacher.text.tokenizers[0], unet=teacher.unet,
        scheduler=TDDScheduler.from_config(SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    recorder = TimestepRecorder(pipe.unet)
    out = pipe("a blue square", image=image, strength=0.5, num_inference_steps=4,
               guidance_scale=1.0, eta=0.3, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    recorder.handle.remove()
    assert recorder.seen == [499, 251]
    hidden, _ = pipe.encode_prompt("a blue square", "cpu", 1, do_classifier_free_guidance=False)
    g = torch.Generator().manual_seed(0)
    posterior = teacher.vae.encode(image * 2 - 1).latent_dist
    x0 = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g))
    x0 = x0 * teacher.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    x = math.sqrt(abar(499)) * x0 + math.sqrt(1 - abar(499)) * noise
    expected = gamma_loop(
        lambda x, t: teacher.unet(x, t, encoder_hidden_states=hidden).sample,
        x, [499, 251], 0.3, g,
    )
    assert torch.allclose(out, expected, atol=1e-4)
