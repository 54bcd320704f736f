"""Helpers for the sampling and export tests: a tiny LoRA student whose adapter matters."""

from __future__ import annotations

import math

import torch

from tdd.models.students import LoRAStudent
from tdd.models.teacher import Teacher


def perturbed_lora_student(
    teacher: Teacher, rank: int = 4, alpha: float = 2, seed: int = 0, std: float = 0.1
) -> LoRAStudent:
    """A LoRA student on ``teacher.unet`` with seeded non-zero ``lora_B`` (peft starts it at 0)."""
    student = LoRAStudent(teacher.unet, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in student.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return student.eval()


class CallCounter:
    """Counts forward calls of a module and the batch sizes they saw."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])

    def remove(self) -> None:
        self.handle.remove()


def diffusers_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """abar[t] as diffusers' DDPMScheduler computes it (independent of tdd.schedule)."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return DDPMScheduler(**{k: scheduler_config[k] for k in keys}).alphas_cumprod.double()


@torch.no_grad()
def reference_sample(
    unet, teacher: Teacher, prompts: list[str], seeds: list[int], timesteps: list[int],
    kind: str, eta: float = 0.0, guidance_scale: float = 1.0, decode: bool = True,
) -> torch.Tensor:
    """Few-step sampling written out step by step, one image at a time (docs/methods.md section 3).

    ``kind`` is ``"gamma"`` (TCD/TDD/PCM: DDIM map to ``s = floor((1 - eta) t')``, re-noise to
    ``t'``) or ``"lcm"`` (boundary-scaled x0, re-noised to ``t'``); the last step ends at
    ``abar[0]`` (gamma) or returns x0 (lcm). Each image draws its initial latent and its step
    noise from its own generator. Returns images in [0, 1] or, with ``decode=False``, latents.
    """
    abar = diffusers_alphas_cumprod(teacher.scheduler_config)
    a, sd = (lambda t: abar[t].sqrt().float()), (lambda t: (1 - abar[t]).sqrt().float())
    empty = teacher.text([""]).hidden
    out = []
    for prompt, seed in zip(prompts, seeds):
        g = torch.Generator().manual_seed(seed)
        cond = teacher.text([prompt]).hidden
        x = torch.randn(1, 4, teacher.resolution // 4, teacher.resolution // 4, generator=g)
        for step, t in enumerate(timesteps):
            eps = unet(x, t, encoder_hidden_states=cond).sample
            if guidance_scale != 1.0:
                eps_u = unet(x, t, encoder_hidden_states=empty).sample
                eps = eps_u + guidance_scale * (eps - eps_u)
            x0 = (x - sd(t) * eps) / a(t)
            last = step == len(timesteps) - 1
            t_next = 0 if last else timesteps[step + 1]
            if kind == "lcm":
                scaled = 10.0 * t
                c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
                x0 = c_skip * x + c_out * x0
                x = x0 if last else a(t_next) * x0 + sd(t_next) * torch.randn(x.shape, generator=g)
                continue
            s = math.floor((1 - eta) * t_next)
            x = a(s) * x0 + sd(s) * eps
            if not last and s < t_next:
                ratio = (abar[t_next] / abar[s]).float()
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * torch.randn(x.shape, generator=g)
        out.append(x)
    latents = torch.cat(out)
    if not decode:
        return latents
    image = teacher.vae.decode(latents / teacher.vae.config.scaling_factor).sample
    return (image * 0.5 + 0.5).clamp(0, 1)
