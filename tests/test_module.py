"""The module's training step against a plain written-out docs/methods.md section 0."""

import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler

from tdd.guidance import CFGGuidance, DecoupledGuidance, NoGuidance, WEmbedGuidance
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


def build_module(strategy, guidance, student=None, prediction_type="epsilon", **module_kwargs):
    teacher = build_tiny()
    teacher.scheduler_config["prediction_type"] = prediction_type
    student = student or partial(LoRAStudent, rank=4, alpha=4)
    module = DistillationModule(teacher, student, strategy, guidance, PseudoHuberLoss(0.001),
                                partial(torch.optim.AdamW, lr=1e-4), seed=SEED,
                                **module_kwargs)
    g = torch.Generator().manual_seed(9)  # a student that differs from its teacher
    with torch.no_grad():
        for p in module.student.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module, teacher


def to_x0_eps(output, x, a_t, s_t, prediction_type):
    """epsilon: x = a x0 + s eps; v = a eps - s x0, so x0 = a x - s v and eps = s x + a v."""
    if prediction_type == "v_prediction":
        return a_t * x - s_t * output, s_t * x + a_t * output
    return (x - s_t * output) / a_t, output


def sinusoidal(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The w embedding of full-model LCM: sin and cos of w * 1000 at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
    angles = w.view(-1, 1) * 1000.0 * freqs.view(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def reference_loss(module, teacher, strategy, guidance, lcm_boundary: bool,
                   networks=None, w_embed_dim=None) -> torch.Tensor:
    """docs/methods.md section 0 written out, with diffusers' own alphas_cumprod.

    ``networks``: (teacher, online, target) UNets; by default the LoRA student's UNet with its
    adapters off (teacher) and on (online and target). ``w_embed_dim``: the student and target
    take the sinusoidal embedding of w as ``timestep_cond``.
    """
    g = torch.Generator().manual_seed(SEED)
    n, k = len(strategy.grid), 1000 // len(strategy.grid)
    abar = DDPMScheduler(**{key: teacher.scheduler_config[key] for key in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}).alphas_cumprod
    a = lambda ts: abar[ts].sqrt().view(-1, 1, 1, 1)  # noqa: E731
    sd = lambda ts: (1 - abar[ts]).sqrt().view(-1, 1, 1, 1)  # noqa: E731
    prediction_type = teacher.scheduler_config["prediction_type"]
    convert = lambda out, x, ts: to_x0_eps(out, x, a(ts), sd(ts), prediction_type)  # noqa: E731
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
    if networks is None:
        unet = module.student.unet
        with module.student.adapters_disabled():
            teacher_unet = copy.deepcopy(unet)
        networks = (teacher_unet, unet, unet)
    teacher_unet, online, target = networks
    extra = {}
    if w_embed_dim is not None:
        extra = {"timestep_cond": sinusoidal(w.flatten(), w_embed_dim)}
    # 3. teacher: two separate passes (as the published scripts do), guided in the LCM form
    with torch.no_grad():
        x0_c, eps_c = convert(teacher_unet(x_t, t, encoder_hidden_states=cond).sample, x_t, t)
        empty = teacher.text([""] * b).hidden
        x0_u, eps_u = convert(teacher_unet(x_t, t, encoder_hidden_states=empty).sample, x_t, t)
    x0_w, eps_w = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
    x_prev = a(t_prev) * x0_w + sd(t_prev) * eps_w
    # 4. student with grad at (x_t, t); target without grad at (x_prev, t_prev)
    out_student = online(x_t, t, encoder_hidden_states=cond, **extra).sample
    x0_student, eps_student = convert(out_student, x_t, t)
    with torch.no_grad():
        out_target = target(x_prev, t_prev, encoder_hidden_states=cond, **extra).sample
    x0_target, eps_target = convert(out_target, x_prev, t_prev)
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


def test_v_prediction_teacher_step_equals_reference():
    """An SD2-style teacher: outputs converted with x0 = a x - s v, eps = s x + a v."""
    strategy, guidance = TDDTarget(num_ddim_timesteps=50), DecoupledGuidance(w=3.5)
    module, teacher = build_module(strategy, guidance, prediction_type="v_prediction")
    loss = module.training_step(BATCH, 0)
    expected = reference_loss(module, teacher, strategy, guidance, False)
    assert abs(loss.item() - expected.item()) < 1e-6
    as_epsilon = copy.deepcopy(teacher)  # the same networks read as epsilon give another loss
    as_epsilon.scheduler_config["prediction_type"] = "epsilon"
    assert abs(reference_loss(module, as_epsilon, strategy, guidance, False) - expected) > 1e-4


def test_full_student_with_ema_and_w_embed_equals_reference():
    """Full fine-tuning: online = the trainable copy, target = its EMA, both given the w
    embedding; after the optimizer step the EMA moves 5 % of the way to the online weights."""
    strategy, guidance = TCDTarget(), WEmbedGuidance(w_min=3.0, w_max=15.0, embedding_dim=256)
    module, teacher = build_module(strategy, guidance, partial(FullStudent, ema_decay=0.95))
    student = module.student
    g = torch.Generator().manual_seed(11)  # an EMA that differs, guidance projection included
    with torch.no_grad():
        for p in student.ema.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    networks = (student.teacher_unet, student.unet, student.ema)
    loss = module.training_step(BATCH, 0)
    expected = reference_loss(module, teacher, strategy, guidance, False, networks, 256)
    assert abs(loss.item() - expected.item()) < 1e-6
    online_target = reference_loss(module, teacher, strategy, guidance, False,
                                   (student.teacher_unet, student.unet, student.unet), 256)
    assert abs(online_target.item() - expected.item()) > 1e-5  # the EMA target matters
    optimizer = module.configure_optimizers()
    ema_before = {n: p.detach().clone() for n, p in student.ema.named_parameters()}
    loss.backward()
    optimizer.step()
    student.update_target()
    for name, online in student.unet.named_parameters():
        expected_ema = 0.95 * ema_before[name] + 0.05 * online.detach()
        assert torch.allclose(student.ema.get_parameter(name), expected_ema, atol=1e-7), name


def loader(steps: int):
    return torch.utils.data.DataLoader([BATCH] * steps, batch_size=None)


def quiet_trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


class LearningRates(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_lr_scheduler_factory_sets_the_lr_of_every_step():
    halve = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 0.5**step)
    module, _ = build_module(TCDTarget(), NoGuidance(), lr_scheduler=halve)
    lrs = LearningRates()
    quiet_trainer(4, callbacks=[lrs]).fit(module, loader(4))
    assert lrs.seen == pytest.approx([1e-4, 5e-5, 2.5e-5, 1.25e-5])


class BucketLogs(L.Callback):
    def __init__(self):
        self.logged = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.logged.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})


def test_per_bucket_losses_are_the_bucket_means_over_the_log_interval():
    module, _ = build_module(TCDTarget(), NoGuidance(), loss_buckets=4)
    per_sample, sources = [], []
    loss_fn, sample_index = module.loss_fn, module.strategy.grid.sample_index

    def recording_loss(a, b):
        per_sample.append(loss_fn(a, b).detach())
        return loss_fn(a, b)

    def recording_index(*args, **kwargs):
        sources.append(sample_index(*args, **kwargs))
        return sources[-1]

    module.loss_fn, module.strategy.grid.sample_index = recording_loss, recording_index
    logs = BucketLogs()
    quiet_trainer(4, callbacks=[logs], log_every_n_steps=2).fit(module, loader(4))
    names = ["train/loss_t0-249", "train/loss_t250-499", "train/loss_t500-749",
             "train/loss_t750-999"]
    assert not any(name in logs.logged[0] for name in names)  # first logged after 2 steps
    for step in (1, 3):
        losses = torch.cat(per_sample[step - 1 : step + 1]).double()
        t = (torch.cat(sources[step - 1 : step + 1]) + 1) * 20 - 1  # N = 50: t = 20 (i + 1) - 1
        assert logs.logged[step]["train/loss"] == pytest.approx(per_sample[step].mean().item())
        for bucket, name in enumerate(names):
            chosen = losses[t // 250 == bucket]
            if len(chosen):
                assert logs.logged[step][name] == pytest.approx(chosen.mean().item(), rel=1e-6)
            else:
                assert math.isnan(logs.logged[step][name])


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


def test_full_student_with_ema_and_w_embed_resumes_like_an_uninterrupted_run(make_cfg, tmp_path):
    """Stop after 2 steps and resume to 4: the online weights, the EMA target and the guidance
    projection equal 4 uninterrupted steps."""
    from pathlib import Path

    from run import train

    common = ["trainer=cpu", "logger=none", "metrics=none", "data.batch_size=2",
              "data.size=8", "callbacks.checkpoint.every_n_train_steps=2", "student=full",
              "student.ema_decay=0.95", "guidance=w_embed", "strategy=tcd",
              "export.enabled=false", "trainer.deterministic=true"]

    def weights(cfg):
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=False)["state_dict"]

    straight = make_cfg(*common, "trainer.max_steps=4")
    train(straight)
    resumed_dir = str(tmp_path / "resumed")
    first = make_cfg(*common, "trainer.max_steps=2")
    first.paths.output_dir = resumed_dir
    train(first)
    after_two = weights(first)
    second = make_cfg(*common, "trainer.max_steps=4", "ckpt_path=last")
    second.paths.output_dir = resumed_dir
    train(second)

    a, b = weights(straight), weights(second)
    assert a.keys() == b.keys()
    assert any(k.startswith("student.ema.") for k in a)
    assert any("time_embedding.cond_proj" in k for k in a)
    assert not any(k.startswith("student.teacher_unet.") for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    ema = "student.ema.conv_in.weight"
    assert not torch.allclose(a[ema], after_two[ema])  # the EMA moved after step 2
