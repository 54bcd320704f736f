"""Rectified-flow teachers (docs/methods.md 0.2): the schedule, the Euler/gamma sampler, loading,
the training step against a written-out reference, guidance refusals and the stock pipelines."""

from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift
from helpers_flow import save_tiny_flux, save_tiny_sd3

from tdd.export import export_student
from tdd.guidance import (
    CFGGuidance,
    DecoupledGuidance,
    EmbeddedGuidance,
    NoGuidance,
    WEmbedGuidance,
)
from tdd.losses import PseudoHuberLoss
from tdd.models.students import FullStudent, LoRAStudent
from tdd.models.teacher import check_teacher_dir, load_teacher
from tdd.models.tiny import build_tiny
from tdd.module import DistillationModule
from tdd.prediction import ddim_map, renoise, to_x0_eps
from tdd.sampling import PCMSampler, TDDSampler, generate
from tdd.schedule import FlowSchedule, flow_sigmas
from tdd.schedulers import TDDFlowScheduler
from tdd.strategies import LCMTarget, PCMTarget, TCDTarget, TDDTarget

SEED = 7
BATCH = {
    "pixel_values": torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1,
    "caption": ["a red circle", "a blue square", "two shapes"],
}
SD3_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
FLUX_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
               "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}


class Folders(dict):
    """Tiny teacher folders, each saved on first use."""

    BUILDERS = {"sd3": save_tiny_sd3, "flux": save_tiny_flux,
                "sd3_no_t5": partial(save_tiny_sd3, t5=False),
                "schnell": partial(save_tiny_flux, guidance_embeds=False)}

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        self[name] = self.BUILDERS[name](self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return Folders(tmp_path_factory.mktemp("flow_teachers"))


_LOADED: dict = {}


def load(folders, name):
    """A fresh copy of the teacher loaded once through ``load_teacher`` (students modify the
    teacher's transformer, so every test gets its own)."""
    key = str(folders[name])
    if key not in _LOADED:
        _LOADED[key] = load_teacher(key, resolution=32, max_sequence_length=8)
    return copy.deepcopy(_LOADED[key])


# -- the schedule --------------------------------------------------------------------------------
def test_flow_sigma_table_is_the_teachers_shifted_table():
    ours = flow_sigmas(SD3_CONFIG)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0).double()
    assert torch.allclose(ours, theirs, atol=1e-6)
    # FLUX: the unshifted table time-shifted by the resolution's mu (16 tokens here)
    mu = diffusers_shift(16)
    base = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).sigmas.flip(0).double()
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    assert torch.allclose(flow_sigmas(FLUX_CONFIG, mu), expected, atol=1e-6)
    with pytest.raises(ValueError, match="mu"):
        flow_sigmas(FLUX_CONFIG)
    with pytest.raises(ValueError, match="shift_terminal"):
        flow_sigmas({**SD3_CONFIG, "shift_terminal": 0.02})


def test_flow_velocity_converts_and_the_ddim_map_is_diffusers_euler_step():
    g = torch.Generator().manual_seed(0)
    schedule = FlowSchedule.from_config(SD3_CONFIG)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, s = torch.tensor([999, 500, 40]), torch.tensor([700, 120, 0])
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = to_x0_eps(eps - x0, x_t, *schedule.coefficients(t, x_t), "flow_prediction")
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    assert torch.allclose(ddim_map(x0_hat, eps_hat, t, schedule), x_t, atol=1e-5)  # s = t
    v = torch.randn(x_t.shape, generator=g)  # any velocity, not only the true one
    mapped = ddim_map(*to_x0_eps(v, x_t, *schedule.coefficients(t, x_t), "flow_prediction"),
                      s, schedule)
    for k in range(3):
        euler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our sigmas, unshifted again
        euler.set_timesteps(sigmas=schedule.sigmas[torch.stack([t[k], s[k]])].tolist())
        step = euler.step(v[k : k + 1], euler.timesteps[0], x_t[k : k + 1]).prev_sample
        assert torch.allclose(mapped[k : k + 1], step, atol=1e-5)


def test_flow_renoising_keeps_the_forward_marginal():
    schedule = FlowSchedule.from_config(SD3_CONFIG)
    like = torch.zeros(4, 1, 1, 1)
    s, t = torch.tensor([0, 100, 400, 998]), torch.tensor([10, 500, 400, 999])
    scale, std = schedule.transition(s, t, like)
    (a_s, s_s), (a_t, s_t) = schedule.coefficients(s, like), schedule.coefficients(t, like)
    assert torch.allclose(scale * a_s, a_t, atol=1e-6)  # x0 keeps its weight
    assert torch.allclose(std**2 + (scale * s_s) ** 2, s_t**2, atol=1e-6)  # total noise
    assert std[2].item() == 0 and scale[2].item() == 1  # s = t: no step
    x = torch.ones(4, 1, 1, 1)
    assert torch.allclose(renoise(x, s, t, schedule, torch.zeros_like(x)), scale * x)


# -- the flow gamma sampler ---------------------------------------------------------------------
def fake_velocity(x, timestep):
    """A deterministic stand-in network: depends on x and on the timestep it is given."""
    return 0.3 * x.sin() + timestep / 1000.0


def run_chain(scheduler, x, **step_kwargs):
    states = []
    for t in scheduler.timesteps:
        x = scheduler.step(fake_velocity(x, t), t, x, **step_kwargs).prev_sample
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("config, mu", [(SD3_CONFIG, None), (FLUX_CONFIG, 0.8)])
def test_flow_gamma_sampler_with_eta_0_is_flow_match_euler(config, mu):
    ours = TDDFlowScheduler.from_config(config, tdd_train_step=50, eta=0.0)
    ours.set_timesteps(num_inference_steps=4, mu=mu)
    assert ours.indices.tolist() == [999, 759, 499, 259]  # the grid schedule, as VP students
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(sigmas=ours.sigmas[:-1].tolist())
    assert torch.allclose(ours.timesteps, euler.timesteps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(run_chain(ours, x), run_chain(euler, x), atol=1e-5)
    ours.set_timesteps(num_inference_steps=4, mu=mu)  # eta = 1: another trajectory
    stochastic = run_chain(ours, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    euler.set_timesteps(sigmas=ours.sigmas[:-1].tolist())
    assert not torch.allclose(stochastic, run_chain(euler, x), atol=1e-3)


def test_flow_gamma_sampler_renoises_with_its_generator_and_takes_the_pipeline_call():
    scheduler = TDDFlowScheduler.from_config(SD3_CONFIG, tdd_train_step=50, eta=0.3)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), device="cpu")  # FluxPipeline's call
    assert scheduler.num_inference_steps == 4 and len(scheduler.sigmas) == 5
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    runs = []
    for seed in (0, 0, 1):
        scheduler.set_timesteps(4)
        scheduler.generator = torch.Generator().manual_seed(seed)  # what pipelines cannot pass
        runs.append(run_chain(scheduler, x))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    # one step by hand: Euler to s = floor(0.7 * 759) = 531, then forward s -> 759
    scheduler.set_timesteps(4)
    t0 = scheduler.timesteps[0]
    v = fake_velocity(x, t0)
    out = scheduler.step(v, t0, x, generator=torch.Generator().manual_seed(3)).prev_sample
    sig = flow_sigmas(SD3_CONFIG).float()
    assert scheduler.indices[1] == 759
    x_s = x + (sig[531] - sig[999]) * v
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    scale = (1 - sig[759]) / (1 - sig[531])
    expected = scale * x_s + (sig[759] ** 2 - (scale * sig[531]) ** 2).sqrt() * z
    assert torch.allclose(out, expected, atol=1e-5)


def test_flow_scheduler_config_round_trip_and_errors(tmp_path):
    scheduler = TDDFlowScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(**{k: v for k, v in FLUX_CONFIG.items()
                                           if not k.startswith("_")}).config,
        tdd_train_step=50, eta=0.3)
    scheduler.save_pretrained(tmp_path)
    loaded = TDDFlowScheduler.from_pretrained(tmp_path)
    assert loaded.config.use_dynamic_shifting and loaded.config.eta == 0.3
    with pytest.raises(ValueError, match="mu"):
        loaded.set_timesteps(4)  # FLUX's shift needs the resolution's mu
    with pytest.raises(ValueError, match="num_inference_steps, sigmas or timesteps"):
        loaded.set_timesteps(mu=0.5)
    with pytest.raises(ValueError, match="set_timesteps"):
        TDDFlowScheduler().step(torch.zeros(1), 1.0, torch.zeros(1))
    with pytest.raises(ValueError, match="eta"):
        TDDFlowScheduler(eta=1.5)
    with pytest.raises(ValueError, match="VP options"):
        TDDSampler(special_jump=True).build_flow(SD3_CONFIG)


def test_pcm_flow_schedule_runs_through_the_phase_edges():
    scheduler = PCMSampler(num_ddim_timesteps=50).build_flow(SD3_CONFIG)
    scheduler.set_timesteps(4)
    assert scheduler.indices.tolist() == [999, 739, 499, 239]
    assert scheduler.config.eta == 0.0
    with pytest.raises(ValueError, match="trained set"):
        scheduler.set_timesteps(timesteps=[999, 500])


# -- teachers ----------------------------------------------------------------------------------
def test_flow_teachers_load_from_local_diffusers_folders(folders, tmp_path):
    sd3, flux, bare = load(folders, "sd3"), load(folders, "flux"), load(folders, "sd3_no_t5")
    assert type(sd3.unet).__name__ == "SD3Transformer2DModel" and sd3.is_flow
    assert type(flux.unet).__name__ == "FluxTransformer2DModel"
    assert sd3.prediction_type == flux.prediction_type == "flow_prediction"
    assert sd3.mu is None and flux.mu == pytest.approx(diffusers_shift(16))  # (8/2)^2 tokens
    assert sd3.shift_factor == pytest.approx(0.1)
    cond = sd3.text(["a red circle"])
    assert cond.hidden.shape == (1, 16 + 8, 32) and cond.added["pooled"].shape == (1, 16)
    assert len(bare.text.encoders) == 2 and bare.text(["a"]).hidden.shape == (1, 24, 32)
    assert flux.text(["a red circle"]).hidden.shape == (1, 8, 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(FileNotFoundError, match="transformer"):
        check_teacher_dir(broken)


SLOW = pytest.mark.slow  # the same refusals run before loading in tests/test_flow_runs.py


def test_collapsed_padding_teacher_equals_the_stock_teacher(folders):
    """SD3 without T5, its zero tokens computed as one: the same outputs and images."""
    from tdd.models.flow import run_transformer

    stock = load_teacher(str(folders["sd3_no_t5"]), resolution=32, max_sequence_length=8,
                         use_t5=False)
    fast = load_teacher(str(folders["sd3_no_t5"]), resolution=32, max_sequence_length=8,
                        use_t5=False, collapse_padding=True)
    prompts = ["a red circle", "two shapes"]
    long, short = stock.text(prompts), fast.text(prompts)
    assert short.hidden.shape[1] == long.hidden.shape[1] - 7  # 8 zero tokens -> 1
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        expected = run_transformer(stock.unet, x, t, long)
        assert torch.allclose(run_transformer(fast.unet, x, t, short), expected, atol=1e-5)
    sampler = TDDSampler(num_ddim_timesteps=50)
    ours = generate(fast.unet, fast, sampler, prompts, [1, 2], 4, guidance_scale=2.0)
    theirs = generate(stock.unet, stock, sampler, prompts, [1, 2], 4, guidance_scale=2.0)
    assert torch.allclose(ours.images, theirs.images, atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_collapsed_padding_is_refused_where_the_padding_is_not_zeros(folders, name):
    with pytest.raises(ValueError, match="model.collapse_padding"):
        load_teacher(str(folders[name]), resolution=32, max_sequence_length=8,
                     collapse_padding=True)


def test_collapsed_padding_is_refused_on_a_unet_teacher(tmp_path):
    from tdd.models.teacher import save_pipeline

    path = save_pipeline(build_tiny(), tmp_path / "sd")
    with pytest.raises(ValueError, match="model.collapse_padding"):
        load_teacher(str(path), resolution=32, collapse_padding=True)


@pytest.mark.parametrize("name, guidance, message", [
    pytest.param("sd3", EmbeddedGuidance(), "guidance_embeds", marks=SLOW),
    pytest.param("schnell", EmbeddedGuidance(), "guidance_embeds", marks=SLOW),
    ("flux", DecoupledGuidance(), "use guidance=embedded"),
    pytest.param("flux", CFGGuidance(), "use guidance=embedded", marks=SLOW),
    pytest.param("flux", NoGuidance(), "use guidance=embedded", marks=SLOW),
    pytest.param("sd3", WEmbedGuidance(), "time_cond_proj_dim", marks=SLOW),
])
def test_guidance_modes_that_cannot_apply_are_refused(folders, name, guidance, message):
    teacher = load(folders, name)
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, FullStudent, TCDTarget(), guidance, PseudoHuberLoss(),
                           partial(torch.optim.AdamW))


def test_embedded_guidance_on_a_unet_teacher_is_refused():
    with pytest.raises(ValueError, match="guidance=embedded"):
        DistillationModule(build_tiny(), FullStudent, TCDTarget(), EmbeddedGuidance(),
                           PseudoHuberLoss(), partial(torch.optim.AdamW))


# -- the training step against the TDD release's flow step, written out -----------------------
def build_module(teacher, strategy, guidance, student=None):
    student = student or partial(LoRAStudent, rank=4, alpha=4)
    module = DistillationModule(teacher, student, strategy, guidance, PseudoHuberLoss(0.001),
                                partial(torch.optim.AdamW, lr=1e-4), seed=SEED)
    g = torch.Generator().manual_seed(9)  # a student that differs from its teacher
    with torch.no_grad():
        for p in module.student.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def call_transformer(model, x, sigma, cond, pooled, guidance=None):
    """The transformer called as its pipeline calls it, on unpacked latents."""
    b, c, h, w = x.shape
    if type(model).__name__ == "FluxTransformer2DModel":  # packed latents, t / 1000
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        out = model(hidden_states=packed, timestep=sigma.float(), guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=cond,
                    txt_ids=torch.zeros(cond.shape[1], 3), img_ids=ids).sample
        return FluxPipeline._unpack_latents(out, h * 4, w * 4, 4)
    return model(hidden_states=x, timestep=sigma.float() * 1000, encoder_hidden_states=cond,
                 pooled_projections=pooled).sample


def reference_loss(module, teacher, strategy, guidance, sigmas, lcm_boundary=False):
    """The flow step of the TDD FLUX release on grid indices: x_t = (1 - sigma) x0 + sigma
    noise; the teacher's guided velocity and one Euler step to t_prev; both branches Euler-
    stepped to sigma at s; the pseudo-Huber loss."""
    g = torch.Generator().manual_seed(SEED)
    n, k, b = len(strategy.grid), 1000 // len(strategy.grid), len(BATCH["caption"])
    sig = lambda idx: sigmas[idx].float().view(-1, 1, 1, 1)  # noqa: E731
    i = torch.randint(0, n, (b,), generator=g)
    t = (i + 1) * k - 1
    t_prev = (t - k).clamp(min=0)
    s = strategy.sample(i, generator=g)
    keep = torch.rand(b, generator=g) >= guidance.empty_prompt_share
    captions = [c if kept else "" for c, kept in zip(BATCH["caption"], keep.tolist())]
    u = torch.rand(b, generator=g, dtype=torch.float64)
    embedded = isinstance(guidance, EmbeddedGuidance)
    low, high = ((guidance.scale_min, guidance.scale_max) if embedded
                 else (guidance.w_min, guidance.w_max))
    w = (low + u * (high - low)).float()
    posterior = teacher.vae.encode(BATCH["pixel_values"]).latent_dist
    latent = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    x0 = (latent - teacher.vae.config.shift_factor) * teacher.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    x_t = sig(t) * noise + (1 - sig(t)) * x0
    enc = teacher.text(captions)
    cond, pooled = enc.hidden, enc.added["pooled"]
    scale = w if embedded else None
    model = module.student.unet
    with module.student.adapters_disabled():
        teacher_model = copy.deepcopy(model)
    with torch.no_grad():
        v = call_transformer(teacher_model, x_t, sigmas[t], cond, pooled, scale)
        if not embedded:
            empty = teacher.text([""] * b)
            v_u = call_transformer(teacher_model, x_t, sigmas[t], empty.hidden,
                                   empty.added["pooled"])
            v = v + w.view(-1, 1, 1, 1) * (v - v_u)  # LCM form, linear in the prediction
        x_prev = x_t + (sig(t_prev) - sig(t)) * v
    v_student = call_transformer(model, x_t, sigmas[t], cond, pooled, scale)
    with torch.no_grad():
        v_target = call_transformer(model, x_prev, sigmas[t_prev], cond, pooled, scale)
    if lcm_boundary:
        def f(x, ts, vel, sigma):
            scaled = ts.double().view(-1, 1, 1, 1) * 10.0
            c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25).sqrt()
            return c_skip.float() * x + c_out.float() * (x - sigma * vel)
        pred, target = f(x_t, t, v_student, sig(t)), f(x_prev, t_prev, v_target, sig(t_prev))
    else:
        pred = x_t + (sig(s) - sig(t)) * v_student  # the release's tdd_step
        target = x_prev + (sig(s) - sig(t_prev)) * v_target
    huber = torch.sqrt((pred - target) ** 2 + 0.001**2) - 0.001
    return huber.flatten(1).mean(1).mean()


@pytest.mark.parametrize("strategy, lcm_boundary", [
    (TDDTarget(num_ddim_timesteps=50), False),
    pytest.param(LCMTarget(), True, marks=pytest.mark.slow),
    pytest.param(PCMTarget(), False, marks=pytest.mark.slow)], ids=["tdd", "lcm", "pcm"])
def test_sd3_training_step_equals_the_written_out_flow_step(folders, strategy, lcm_boundary):
    teacher = load(folders, "sd3")
    guidance = DecoupledGuidance(w=3.5, empty_prompt_share=0.5)
    module = build_module(teacher, strategy, guidance)
    loss = module.training_step(BATCH, 0)
    sigmas = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)  # diffusers' own table
    expected = reference_loss(module, teacher, strategy, guidance, sigmas, lcm_boundary)
    assert loss.requires_grad
    assert abs(loss.item() - expected.item()) < 1e-6


def test_flux_training_step_with_embedded_guidance_equals_the_written_out_step(folders):
    teacher = load(folders, "flux")
    strategy, guidance = TDDTarget(num_ddim_timesteps=50), EmbeddedGuidance(2.0, 5.0)
    module = build_module(teacher, strategy, guidance)
    loss = module.training_step(BATCH, 0)
    base = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).sigmas.flip(0).double()
    mu = diffusers_shift(16)
    sigmas = (math.exp(mu) / (math.exp(mu) + (1 / base - 1))).float()
    expected = reference_loss(module, teacher, strategy, guidance, sigmas)
    assert abs(loss.item() - expected.item()) < 1e-6
    # the step really depends on the scale fed to the transformer
    other = reference_loss(module, teacher, strategy, EmbeddedGuidance(9.0, 9.0), sigmas)
    assert abs(other.item() - expected.item()) > 1e-6


# -- students, export and the stock pipelines --------------------------------------------------
def test_lora_targets_the_attention_and_feed_forward_projections(folders):
    for name in ("sd3", "flux"):
        student = LoRAStudent(load(folders, name).unet, rank=4, alpha=4)
        adapted = {k.rsplit(".lora_A", 1)[0] for k in student.trainable_state_dict()
                   if ".lora_A" in k}
        assert any(k.endswith("attn.to_q") for k in adapted)
        assert any(k.endswith("attn.add_k_proj") for k in adapted)
        assert any(k.endswith("ff.net.2") for k in adapted)
        # (a one-block SD3 has no context feed-forward: its last block is context_pre_only)
        assert name == "sd3" or any(k.endswith("ff_context.net.0.proj") for k in adapted)


def test_lora_sampling_merges_transformer_adapters_and_restores_them(folders):
    teacher = load(folders, "flux")
    student = LoRAStudent(teacher.unet, rank=4, alpha=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    state = {k: v.clone() for k, v in student.unet.state_dict().items()}
    sampler, prompts, seeds = TDDSampler(num_ddim_timesteps=50), ["a red circle"], [4]
    ours = generate(student.unet, teacher, sampler, prompts, seeds, 4, guidance_scale=3.5)
    with student.sampling() as unet:
        merged = generate(unet, teacher, sampler, prompts, seeds, 4, guidance_scale=3.5)
    assert torch.allclose(merged.images, ours.images, atol=1e-5)
    assert all(torch.equal(student.unet.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, pipeline_cls, scale", [
    pytest.param("sd3", StableDiffusion3Pipeline, 1.0, marks=pytest.mark.slow),
    ("flux", FluxPipeline, 3.5)])
def test_stock_pipeline_with_the_exported_lora_reproduces_generate(folders, tmp_path, name,
                                                                   pipeline_cls, scale):
    teacher = load(folders, name)
    student = LoRAStudent(teacher.unet, rank=4, alpha=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    sampler = TDDSampler(num_ddim_timesteps=50, eta=0.2)
    prompts, seeds = ["a red circle", "two shapes"], [11, 12]
    ours = generate(student.unet, teacher, sampler, prompts, seeds, 4, guidance_scale=scale)
    export_student(student, sampler, teacher.scheduler_config, tmp_path / "export", steps=[4])
    pipe = pipeline_cls.from_pretrained(folders[name])
    pipe.load_lora_weights(tmp_path / "export")  # unchanged, by the stock loader
    pipe.scheduler = TDDFlowScheduler.from_pretrained(tmp_path / "export" / "scheduler")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    pipe.scheduler.generator = generators  # the step noise continues each image's stream
    images = pipe(prompts, num_inference_steps=4, guidance_scale=scale, generator=generators,
                  height=32, width=32, max_sequence_length=8, output_type="pt").images
    assert torch.allclose(images, ours.images, atol=1e-5)
    without = pipeline_cls.from_pretrained(folders[name])  # the LoRA matters
    without.scheduler = TDDFlowScheduler.from_pretrained(tmp_path / "export" / "scheduler")
    without.scheduler.generator = [torch.Generator().manual_seed(s) for s in seeds]
    plain = without(prompts, num_inference_steps=4, guidance_scale=scale, height=32, width=32,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    max_sequence_length=8, output_type="pt").images
    assert (plain - ours.images).abs().max() > 1e-3


def test_full_student_exports_a_loadable_transformer(folders, tmp_path):
    from diffusers import SD3Transformer2DModel

    teacher = load(folders, "sd3")
    student = FullStudent(teacher.unet, ema_decay=0.9)
    path = student.export(tmp_path)
    assert path.name == "transformer"
    loaded = SD3Transformer2DModel.from_pretrained(path)
    assert torch.equal(loaded.state_dict()["proj_out.weight"],
                       student.sampling_unet.state_dict()["proj_out.weight"])
    with pytest.raises(ValueError, match="kohya"):
        LoRAStudent(teacher.unet, rank=2, alpha=2).export(tmp_path / "k", "kohya")


@pytest.mark.slow
def test_half_precision_teacher_and_gradient_checkpointing_on_a_flow_transformer(folders):
    """The frozen transformer in bfloat16 beside fp32 LoRA weights, and gradient
    checkpointing, as for UNet teachers: checkpointing leaves loss and gradients unchanged."""
    strategy, guidance = TCDTarget(), EmbeddedGuidance()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # PEFT draws the LoRA initialisation from the global generator
        student = partial(LoRAStudent, rank=4, alpha=4, gradient_checkpointing=checkpointing)
        module = build_module(load(folders, "flux"), strategy, guidance, student)
        loss = module.training_step(BATCH, 0)
        loss.backward()
        grads = [p.grad.clone() for p in module.student.trainable_parameters()]
        results.append((loss.item(), grads))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))
    half = load_teacher(str(folders["flux"]), 32, dtype="bfloat16", max_sequence_length=8)
    module = build_module(half, strategy, guidance)
    assert half.unet.dtype == half.vae.dtype == half.text.encoders[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.student.trainable_parameters())
    loss = module.training_step(BATCH, 0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None for p in module.student.trainable_parameters())
