"""The adversarial term (docs/methods.md section 1.2): the discriminator's features, the hinge
steps against a written-out reference, which weights each step moves, resume and export."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import hydra
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tdd.adversarial import Discriminator, HingeAdversarial, NoAdversarial, unet_features
from tdd.adversarial.hinge import noisy_timestep
from tdd.guidance import DecoupledGuidance, NoGuidance, WEmbedGuidance
from tdd.losses import PseudoHuberLoss
from tdd.models.students import FullStudent, LoRAStudent
from tdd.models.tiny import build_tiny
from tdd.module import CheckpointMismatch, DistillationModule
from tdd.strategies import TDDTarget

SEED = 7
BATCH = {
    "pixel_values": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1,
    "caption": ["a red circle", "a blue square", "a green triangle", "two shapes"],
}
HINGE = partial(HingeAdversarial, norm_groups=8)


def build(student=None, guidance=None, adversarial=HINGE, strategy=None, **kwargs):
    teacher = build_tiny()
    module = DistillationModule(
        teacher, student or partial(LoRAStudent, rank=4, alpha=4),
        strategy or TDDTarget(num_ddim_timesteps=50), guidance or DecoupledGuidance(),
        PseudoHuberLoss(0.001), partial(torch.optim.AdamW, lr=1e-3), seed=SEED,
        adversarial=adversarial, **kwargs)
    g = torch.Generator().manual_seed(9)  # a student that differs from its teacher
    with torch.no_grad():
        for p in module.student.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def at_step(step: int):
    """Pretend the trainer is at optimizer step ``step`` (even: discriminator, odd: student)."""
    return mock.patch.object(DistillationModule, "global_step", new_callable=mock.PropertyMock,
                             return_value=step)


def hooked_features(unet, x, t, hidden, **kwargs) -> list[torch.Tensor]:
    """The down- and mid-block outputs of the UNet's own full forward, caught by hooks."""
    caught = []

    def keep(module, args, output):
        caught.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(keep) for block in [*unet.down_blocks,
                                                                unet.mid_block]]
    try:
        unet(x, t, encoder_hidden_states=hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return caught


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_features_are_the_unets_own_down_and_mid_block_outputs(sdxl):
    teacher = build_tiny(sdxl=sdxl)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    cond = teacher.text(["a red circle", ""])
    kwargs = cond.unet_kwargs()
    expected = hooked_features(teacher.unet, x, t, kwargs.pop("encoder_hidden_states"), **kwargs)
    features = unet_features(teacher.unet, x, t, cond)
    assert len(features) == len(teacher.unet.down_blocks) + 1 == 3
    for got, want in zip(features, expected):
        assert torch.allclose(got, want, atol=1e-6)
    other = unet_features(teacher.unet, x, t, teacher.text(["a blue square", "two shapes"]))
    assert not torch.allclose(other[-1], features[-1])  # the prompt reaches the features
    logits = Discriminator(teacher.unet, norm_groups=8).logits(features)
    assert [tuple(logit.shape) for logit in logits] == [(2, 1, 4, 4), (2, 1, 4, 4),
                                                         (2, 1, 4, 4)]


def test_noisy_timestep_spans_s_to_s_plus_a_quarter_of_t():
    s = torch.tensor([0, 100, 800, 998]).repeat_interleave(2000)
    u = noisy_timestep(s, 1000, 4, torch.Generator().manual_seed(0))
    for start in (0, 100, 800, 998):
        drawn = u[s == start]
        high = min(start + 250, 1000)
        assert drawn.min() == start and drawn.max() == high - 1
    twice = noisy_timestep(s, 1000, 4, torch.Generator().manual_seed(0))
    assert torch.equal(u, twice)


def test_non_teacher_unet_is_refused():
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        HingeAdversarial(torch.nn.Linear(2, 2))


# -- a written-out discriminator step and student step ---------------------------------------
def run_step(module, step):
    """One training step at ``step``: the loss and what reached the adversarial term."""
    seen = {}
    objective = module.adversarial.objective

    def recording(mod, consistency, pred_s, target_s, s, cond):
        seen.update(consistency=consistency.detach(), pred_s=pred_s, target_s=target_s, s=s,
                    cond=cond, generator=mod.generator.get_state())
        return objective(mod, consistency, pred_s, target_s, s, cond)

    with at_step(step), mock.patch.object(module.adversarial, "objective", recording):
        loss = module.training_step(BATCH, 0)
    return loss, seen


def reference_adversarial(module, seen, step) -> torch.Tensor:
    """docs/methods.md section 1.2 written out: re-noise both branches s -> u with fixed draws,
    teacher features (the UNet's own forward, adapters off), the heads, hinge losses."""
    g = torch.Generator()
    g.set_state(seen["generator"])
    s = seen["s"]
    high = torch.clamp(s + 1000 // 4, max=1000)
    u = s + (torch.rand(len(s), generator=g, dtype=torch.float64) * (high - s)).long()
    noise_real = torch.randn(seen["target_s"].shape, generator=g)
    noise_fake = torch.randn(seen["pred_s"].shape, generator=g)
    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012).alphas_cumprod.double()
    ratio = (abar[u] / abar[s]).float().view(-1, 1, 1, 1)
    real = ratio.sqrt() * seen["target_s"] + (1 - ratio).sqrt() * noise_real
    fake = ratio.sqrt() * seen["pred_s"] + (1 - ratio).sqrt() * noise_fake
    with module.student.as_teacher() as unet:
        teacher_unet = copy.deepcopy(unet)  # for a LoRA student: a copy with adapters off
    heads = module.adversarial.discriminator.heads

    def logits(x):
        features = hooked_features(teacher_unet, x, u, seen["cond"].hidden)
        return [head(f) for head, f in zip(heads, features)]

    if step % 2 == 0:
        r, f = logits(real), logits(fake)
        per_head = [F.relu(1 - a).mean() + F.relu(1 + b).mean() for a, b in zip(r, f)]
        return sum(per_head) / len(per_head)
    per_head = [F.relu(1 - b).mean() for b in logits(fake)]
    return seen["consistency"] + 0.1 * sum(per_head) / len(per_head)


@pytest.mark.parametrize("step", [0, 1], ids=["discriminator", "student"])
@pytest.mark.parametrize("student", ["lora", "full"])
def test_hinge_steps_equal_the_written_out_reference(step, student):
    kind = partial(FullStudent) if student == "full" else None
    module = build(student=kind)
    loss, seen = run_step(module, step)
    expected = reference_adversarial(module, seen, step)
    assert abs(loss.item() - expected.item()) < 1e-5
    assert abs(loss.item() - seen["consistency"].item()) > 1e-4  # the term adds something
    if student == "lora":  # with the adapters on, the discriminator would see other features
        adapters_on = copy.deepcopy(module.student.unet)
        with mock.patch.object(type(module.student), "as_teacher",
                               lambda self: _yielding(adapters_on)):
            assert abs(run_step(module, step)[0].item() - loss.item()) > 1e-6


class _yielding:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_discriminator_step_sends_gradient_to_the_heads_only():
    module = build()
    loss, _ = run_step(module, 0)
    loss.backward()
    found = grads(module)
    assert found and all(n.startswith("adversarial.discriminator.heads.") for n in found)
    assert len(found) == len(list(module.adversarial.parameters()))


def test_student_step_gradient_is_consistency_plus_generator_term():
    module = build()
    run_step(module, 1)[0].backward()
    total = grads(module)
    assert total and all("lora_" in n for n in total)  # no head, no teacher weight
    plain = build(adversarial=partial(HINGE, weight=0.0))  # the same draws, no G term
    run_step(plain, 1)[0].backward()
    consistency = grads(plain)
    assert consistency.keys() == total.keys()
    assert max(g.abs().max() for g in consistency.values()) > 1e-6
    difference = max((total[n] - consistency[n]).abs().max() for n in total)
    assert difference > 1e-6  # the generator term reaches the student too


def test_gradient_checkpointing_does_not_change_the_generator_gradient():
    """A checkpointed block recomputed in backward with the adapters back on would give other
    gradients: the discriminator's forward runs without checkpointing."""
    results = []
    for checkpointing in (False, True):
        module = build(student=partial(LoRAStudent, rank=4, alpha=4,
                                       gradient_checkpointing=checkpointing))
        module.train()
        run_step(module, 1)[0].backward()
        results.append(grads(module))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-6), name


# -- which weights each step moves (a real Trainer) --------------------------------------------
class Snapshots(L.Callback):
    def __init__(self):
        self.taken = []

    def take(self, module):
        self.taken.append({n: p.detach().clone() for n, p in module.named_parameters()})

    def on_train_start(self, trainer, module):
        self.take(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.take(module)


def quiet_trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def loader(steps: int):
    return torch.utils.data.DataLoader([BATCH] * steps, batch_size=None)


def changed(before, after, prefix="") -> set[str]:
    return {n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("student", ["lora", "full_ema"])
def test_steps_alternate_heads_then_student_and_the_teacher_never_moves(student):
    kind = partial(FullStudent, ema_decay=0.5) if student == "full_ema" else None
    guidance = WEmbedGuidance() if kind else NoGuidance()
    module = build(student=kind, guidance=guidance)
    snapshots = Snapshots()
    quiet_trainer(4, callbacks=[snapshots], gradient_clip_val=1.0).fit(module, loader(4))
    heads = {n for n in snapshots.taken[0] if n.startswith("adversarial.")}
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    trainable = {f"student.{n}" for n in trainable}
    for step in range(4):
        moved = changed(snapshots.taken[step], snapshots.taken[step + 1])
        if step % 2 == 0:  # discriminator step: every head moves, nothing else
            assert moved == heads, step
        else:  # student step: only the student's trainable weights (and its EMA)
            assert moved and moved <= trainable | changed(
                snapshots.taken[step], snapshots.taken[step + 1], "student.ema."), step
            assert not moved & heads
    frozen = set(snapshots.taken[0]) - heads - trainable
    frozen = {n for n in frozen if not n.startswith("student.ema.")}
    assert frozen and not changed(snapshots.taken[0], snapshots.taken[-1]) & frozen
    if kind:  # the EMA target moves on student steps only
        ema = "student.ema.conv_in.weight"
        assert torch.equal(snapshots.taken[0][ema], snapshots.taken[1][ema])
        assert not torch.equal(snapshots.taken[1][ema], snapshots.taken[2][ema])


def test_discriminator_gradient_is_clipped_to_its_own_setting():
    module = build(adversarial=partial(HINGE, gradient_clip_val=1e-3))
    run_step(module, 0)[0].backward()
    with mock.patch.object(module.adversarial.optimizer, "step") as step:
        module.adversarial.step()
    assert step.called
    # the step clipped before stepping, then cleared the gradients
    assert all(p.grad is None for p in module.adversarial.parameters())
    module = build(adversarial=partial(HINGE, gradient_clip_val=1e-3))
    run_step(module, 0)[0].backward()
    norms = []
    with mock.patch.object(module.adversarial.optimizer, "step",
                           lambda: norms.append(torch.nn.utils.get_total_norm(
                               [p.grad for p in module.adversarial.parameters()]))):
        module.adversarial.step()
    assert norms[0] == pytest.approx(1e-3, rel=1e-4)


class LearningRates(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((trainer.optimizers[0].param_groups[0]["lr"],
                          module.adversarial.optimizer.param_groups[0]["lr"]))


def test_lr_schedule_counts_student_steps_and_leaves_the_discriminator_lr():
    halve = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 0.5**step)
    module = build(guidance=NoGuidance(), lr_scheduler=halve)
    lrs = LearningRates()
    quiet_trainer(5, callbacks=[lrs]).fit(module, loader(5))
    assert [a for a, _ in lrs.seen] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert [b for _, b in lrs.seen] == pytest.approx([1e-5] * 5)


# -- checkpoints, resume, export -----------------------------------------------------------
def test_checkpoint_holds_the_heads_and_their_optimizer_and_restores_them(tmp_path):
    module = build(guidance=NoGuidance())
    trainer = quiet_trainer(2)
    trainer.fit(module, loader(2))
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    heads = {k for k in saved["state_dict"] if k.startswith("adversarial.")}
    assert heads == {f"adversarial.{k}" for k in module.adversarial.state_dict()}
    assert saved["adversarial_optimizer"]["state"]  # AdamW moments of the heads
    assert saved["recipe"]["adversarial"] == "HingeAdversarial"

    fresh = build(guidance=NoGuidance())
    assert not torch.equal(fresh.adversarial.discriminator.heads[0].out.weight,
                           module.adversarial.discriminator.heads[0].out.weight)
    quiet_trainer(2).fit(fresh, loader(2), ckpt_path=path)  # restores, then stops at once
    for key, value in module.adversarial.state_dict().items():
        assert torch.equal(fresh.adversarial.state_dict()[key], value), key
    before, after = module.adversarial.optimizer.state_dict(), fresh.adversarial.optimizer
    for index, state in before["state"].items():
        for name, tensor in state.items():
            assert torch.equal(after.state_dict()["state"][index][name], tensor), name

    plain = build(guidance=NoGuidance(), adversarial=None)
    with pytest.raises(CheckpointMismatch, match="another adversarial"):
        plain.on_load_checkpoint(saved)


def test_resumed_adversarial_run_equals_an_uninterrupted_one(make_cfg, tmp_path):
    from run import train

    common = ["trainer=cpu", "logger=none", "metrics=none", "data.batch_size=2", "data.size=8",
              "callbacks.checkpoint.every_n_train_steps=2", "student.rank=4", "student.alpha=4",
              "strategy=tcd", "adversarial=hinge", "adversarial.norm_groups=8",
              "trainer.deterministic=true"]

    def saved(cfg):
        return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
                          weights_only=False)

    straight = make_cfg(*common, "trainer.max_steps=4")
    results = train(straight)
    first = make_cfg(*common, "trainer.max_steps=2", "export.enabled=false")
    first.paths.output_dir = str(tmp_path / "resumed")
    train(first)
    second = make_cfg(*common, "trainer.max_steps=4", "ckpt_path=last")
    second.paths.output_dir = str(tmp_path / "resumed")
    train(second)

    a, b = saved(straight), saved(second)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("adversarial.") for k in a["state_dict"])
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], atol=1e-7), key
    for index, state in a["adversarial_optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.allclose(b["adversarial_optimizer"]["state"][index][name], tensor,
                                  atol=1e-9), name
    assert {"train/d_loss", "train/g_loss", "train/logit_real", "train/logit_fake"} <= set(
        results["train"])
    from safetensors.torch import load_file

    keys = load_file(results["export"]).keys()  # the exported LoRA: no discriminator weight
    assert keys and all("lora" in k and "head" not in k for k in keys)


# -- configuration -----------------------------------------------------------------------------
def test_every_adversarial_option_instantiates(make_cfg, tiny_teacher):
    for option, kind in (("none", NoAdversarial), ("hinge", HingeAdversarial)):
        factory = hydra.utils.instantiate(make_cfg(f"adversarial={option}").adversarial)
        term = factory(unet=tiny_teacher.unet)
        assert type(term) is kind
    term = hydra.utils.instantiate(make_cfg("adversarial=hinge").adversarial)(
        unet=tiny_teacher.unet)
    assert (term.weight, term.k_min, term.gradient_clip_val) == (0.1, 4, 1.0)
    group = term.optimizer.param_groups[0]
    assert type(term.optimizer) is torch.optim.AdamW
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-5, (0.0, 0.999),
                                                                           1e-3)
    three = hydra.utils.instantiate(make_cfg("adversarial=hinge",
                                             "adversarial.kernel_size=3").adversarial)
    assert three(unet=tiny_teacher.unet).discriminator.heads[0].out.kernel_size == (3, 3)


@pytest.mark.parametrize("override, setting", [
    ("adversarial.weight=-1", "adversarial.weight"),
    ("adversarial.k_min=0", "adversarial.k_min"),
    ("adversarial.kernel_size=2", "adversarial.kernel_size"),
    ("adversarial.gradient_clip_val=0", "adversarial.gradient_clip_val"),
])
def test_bad_adversarial_settings_fail_before_any_model_loads(make_cfg, monkeypatch, override,
                                                              setting):
    from run import train

    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the config was checked")

    monkeypatch.setattr("tdd.models.tiny.build_tiny", must_not_load)
    with pytest.raises(ValueError, match=setting):
        train(make_cfg("adversarial=hinge", override, "debug=fdr"))


def test_fp16_mixed_is_refused_and_ddp_finds_unused_parameters():
    term = HINGE(build_tiny().unet)
    with pytest.raises(ValueError, match="bf16-mixed"):
        term.setup(SimpleNamespace(precision="16-mixed", strategy=None))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    term.setup(trainer)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True


@pytest.mark.parametrize("strategy", ["tdd", "lcm", "tcd", "pcm"])
def test_fast_dev_run_with_the_hinge_term(make_cfg, strategy):
    from run import train

    cfg = make_cfg(f"strategy={strategy}", "adversarial=hinge", "debug=fdr",
                   "data.batch_size=2")
    results = train(cfg)
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    assert "train/d_loss" in results["train"]  # fast_dev_run's one step trains the heads


@pytest.mark.parametrize("overrides", [
    ["student=full", "guidance=w_embed", "model.sdxl=true"],
    ["guidance=cfg", "student.gradient_checkpointing=true"],
    ["guidance=none", "trainer.max_steps=2", "debug=default", "callbacks=none"],
], ids=["full-w_embed-sdxl", "cfg-checkpointing", "none-two-steps"])
def test_hinge_runs_with_other_students_guidance_and_teachers(make_cfg, overrides):
    from run import train

    debug = [] if any(o.startswith("debug=") for o in overrides) else ["debug=fdr"]
    cfg = make_cfg("adversarial=hinge", *debug, "data.batch_size=2", "export.enabled=false",
                   *overrides)
    results = train(cfg)
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    if "trainer.max_steps=2" in overrides:
        assert "train/g_loss" in results["train"]


@pytest.mark.slow
def test_hinge_under_ddp_on_two_cpu_processes(tmp_path):
    """Two gloo processes: each step leaves the student or the heads without gradient, which
    DDP accepts only with find_unused_parameters (set by the term)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "run.py", "debug=default", "trainer=ddp_sim", "logger=none",
               "model=tiny", "data=dummy", "metrics=none", "adversarial=hinge",
               "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["timings"]["global_step"] == 2
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["adversarial_optimizer"]["state"]
