"""The module's training step against a plain written-out docs/methods.md section 0."""

from functools import partial

import pytest
import torch
from diffusers import DDPMScheduler

from tdd.guidance import CFGGuidance, DecoupledGuidance, NoGuidance
from tdd.losses import PseudoHuberLoss
from tdd.models.students import FullStudent, LoRAStudent
from tdd.models.tiny import build_tiny
from tdd.module import DistillationModule
from tdd.strategies import LCMTarget, PCMTarget, TCDTarget, TDDTarget

SEED = 123
BATCH = {
    "pixel_values": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1,
    "caption": ["a red circle", "a blue square", "a green triangle", "two shapes"],
}


def build_module(strategy, guidance, student=None):
    teacher = build_tiny()
    student = student or partial(LoRAStudent, rank=4, alpha=4)
    module = DistillationModule(teacher, student, strategy, guidance, PseudoHuberLoss(0.001),
                                partial(torch.optim.AdamW, lr=1e-4), seed=SEED)
    g = torch.Generator().manual_seed(9)  # a student that differs from its teacher
    with torch.no_grad():
        for p in module.student.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module, teacher


def reference_loss(module, teacher, strategy, guidance, lcm_boundary: bool) -> torch.Tensor:
    """docs/methods.md section 0 written out, with diffusers' own alphas_cumprod."""
    g = torch.Generator().manual_seed(SEED)
    n, k = len(strategy.grid), 1000 // len(strategy.grid)
    abar = DDPMScheduler(**{key: teacher.scheduler_config[key] for key in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}).alphas_cumprod
    a = lambda ts: abar[ts].sqrt().view(-1, 1, 1, 1)  # noqa: E731
    sd = lambda ts: (1 - abar[ts]).sqrt().view(-1, 1, 1, 1)  # noqa: E731
    b = len(BATCH["caption"])
    # 1. i, t, t_prev and s
    i = torch.randint(0, n, (b,), generator=g)
    t = (i + 1) * k - 1
    t_prev = (t - k).clamp(min=0)
    s = strategy.sample(i, generator=g)
    # caption dropout and w, drawn in the module's documented order
    keep = torch.rand(b, generator=g) >= guidance.empty_prompt_share
    captions = [c if kept else "" for c, kept in zip(BATCH["caption"], keep.tolist())]
    u = torch.rand(b, generator=g, dtype=torch.float64)
    w = (guidance.w_min + u * (guidance.w_max - guidance.w_min)).float().view(-1, 1, 1, 1)
    # 2. x0 = VAE latent sample * scaling factor; x_t
    posterior = teacher.vae.encode(BATCH["pixel_values"]).latent_dist
    latent_noise = torch.randn(posterior.mean.shape, generator=g)
    x0 = (posterior.mean + posterior.std * latent_noise) * teacher.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    x_t = a(t) * x0 + sd(t) * noise
    cond = teacher.text(captions).hidden
    unet = module.student.unet
    # 3. teacher: two separate passes (as the published scripts do), guided in the LCM form
    with torch.no_grad(), module.student.adapters_disabled():
        eps_c = unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = unet(x_t, t, encoder_hidden_states=teacher.text([""] * b).hidden).sample
    x0_c, x0_u = (x_t - sd(t) * eps_c) / a(t), (x_t - sd(t) * eps_u) / a(t)
    x0_w, eps_w = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
    x_prev = a(t_prev) * x0_w + sd(t_prev) * eps_w
    # 4. student with grad at (x_t, t); target without grad at (x_prev, t_prev)
    eps_student = unet(x_t, t, encoder_hidden_states=cond).sample
    with torch.no_grad():
        eps_target = unet(x_prev, t_prev, encoder_hidden_states=cond).sample
    x0_student = (x_t - sd(t) * eps_student) / a(t)
    x0_target = (x_prev - sd(t_prev) * eps_target) / a(t_prev)
    # 5. both mapped to s
    if lcm_boundary:
        def f(x, ts, x0_hat):
            scaled = ts.double().view(-1, 1, 1, 1) * 10.0
            c_skip = 0.25 / (scaled**2 + 0.25)
            c_out = scaled / (scaled**2 + 0.25).sqrt()
            return c_skip.float() * x + c_out.float() * x0_hat
        pred, target = f(x_t, t, x0_student), f(x_prev, t_prev, x0_target)
    else:
        pred = a(s) * x0_student + sd(s) * eps_student
        target = a(s) * x0_target + sd(s) * eps_target
    huber = torch.sqrt((pred - target) ** 2 + 0.001**2) - 0.001
    return huber.flatten(1).mean(1).mean()


@pytest.mark.parametrize(
    "strategy, lcm_boundary",
    [(TDDTarget(num_ddim_timesteps=50), False), (LCMTarget(), True), (TCDTarget(), False),
     (PCMTarget(), False)],
    ids=["tdd", "lcm", "tcd", "pcm"],
)
def test_training_step_equals_the_written_out_algorithm(strategy, lcm_boundary):
    guidance = DecoupledGuidance(w=3.5, empty_prompt_share=0.5)
    module, teacher = build_module(strategy, guidance)
    loss = module.training_step(BATCH, 0)
    expected = reference_loss(module, teacher, strategy, guidance, lcm_boundary)
    assert loss.requires_grad
    assert abs(loss.item() - expected.item()) < 1e-6


def test_cfg_guidance_step_equals_reference():
    strategy, guidance = TCDTarget(), CFGGuidance(w_min=4.0, w_max=5.0)
    module, teacher = build_module(strategy, guidance)
    expected = reference_loss(module, teacher, strategy, guidance, False)
    assert abs(module.training_step(BATCH, 0).item() - expected.item()) < 1e-6


def test_gradient_reaches_only_the_student():
    module, _ = build_module(TDDTarget(num_ddim_timesteps=50), NoGuidance())
    module.training_step(BATCH, 0).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_pcm_target_at_a_phase_edge_is_the_teacher_step():
    strategy = PCMTarget()
    x_prev, t_prev = torch.randn(2, 4, 8, 8), torch.tensor([239, 239])
    s = torch.tensor([239, 0])
    out = strategy.project_target(x_prev, t_prev, torch.zeros_like(x_prev),
                                  torch.zeros_like(x_prev), s, build_module(strategy,
                                                                             NoGuidance())[0].schedule)
    assert torch.equal(out[0], x_prev[0]) and torch.equal(out[1], torch.zeros_like(x_prev[1]))


def test_checkpoint_holds_trainable_state_and_generator(tmp_path):
    module, _ = build_module(TCDTarget(), DecoupledGuidance())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    full, _ = build_module(TCDTarget(), DecoupledGuidance(), partial(FullStudent, ema_decay=0.9))
    checkpoint = {}
    full.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("student.teacher_unet") for k in checkpoint["state_dict"])
    assert any(k.startswith("student.ema.") for k in checkpoint["state_dict"])
    draws = torch.rand(3, generator=full.generator)
    full.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(3, generator=full.generator), draws)


def test_non_finite_loss_stops_with_a_message():
    module, _ = build_module(TCDTarget(), DecoupledGuidance())
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.log_loss(torch.tensor([1.0, float("nan")]), torch.tensor([10, 20]))


def test_checkpoint_from_another_student_is_refused():
    module, _ = build_module(TCDTarget(), DecoupledGuidance())
    with pytest.raises(KeyError, match="another student config"):
        module.on_load_checkpoint({"state_dict": {"student.ema.conv_in.weight": torch.zeros(1)}})
