"""Few-step sampling of distilled students: one code path for evaluation and users.

A :class:`Sampler` turns the teacher's scheduler config into the diffusers scheduler of one
method (docs/methods.md section 3); :func:`generate` runs any sampler on any student. Every
image has its own ``torch.Generator`` (seeded by its seed) for its initial latent and for every
step's noise, so image k is the same whatever the batch size or the other prompts in its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from tdd.embedding import guidance_embedding
from tdd.models.conditioning import Conditioning
from tdd.models.teacher import Teacher
from tdd.schedule import DistillationGrid, check_eta
from tdd.schedulers import TDDScheduler

#: Settings every sampler forces on the teacher config: no x0 clipping or thresholding.
_SAFE = {"clip_sample": False, "thresholding": False}


@dataclass(frozen=True)
class Sampler:
    """How one method samples: the scheduler it builds and the step arguments it needs.

    ``num_ddim_timesteps`` is the grid size N the student was distilled on.
    """

    num_ddim_timesteps: int = 50

    def build(self, scheduler_config: Mapping) -> SchedulerMixin:
        raise NotImplementedError

    def set_timesteps(self, scheduler: SchedulerMixin, num_steps: int, device=None) -> None:
        scheduler.set_timesteps(num_steps, device=device)

    def step_kwargs(self) -> dict:
        """Keyword arguments of ``scheduler.step`` besides the generator."""
        return {}


@dataclass(frozen=True)
class TDDSampler(Sampler):
    """TDD: gamma sampler with eta = 0.2 (:class:`TDDScheduler`), optional published
    non-equidistant schedules and x0 clipping."""

    num_ddim_timesteps: int = 250
    eta: float = 0.2
    special_jump: bool = False
    clip_x0: bool = False
    clip_steps: int = 1
    k_min: int = 4
    k_max: int = 8

    def __post_init__(self):
        check_eta(self.eta, "sampler.eta")

    def build(self, scheduler_config):
        return TDDScheduler.from_config(
            dict(scheduler_config), tdd_train_step=self.num_ddim_timesteps, eta=self.eta,
            special_jump=self.special_jump, clip_x0=self.clip_x0, clip_steps=self.clip_steps,
            k_min=self.k_min, k_max=self.k_max,
        )

    def step_kwargs(self):
        return {"eta": self.eta}


@dataclass(frozen=True)
class LCMSampler(Sampler):
    """LCM: predict the boundary-scaled x0, re-noise to the next timestep; the last step
    returns x0 (diffusers' ``LCMScheduler``)."""

    timestep_scaling: float = 10.0

    def build(self, scheduler_config):
        return LCMScheduler.from_config(
            dict(scheduler_config), original_inference_steps=self.num_ddim_timesteps,
            timestep_scaling=self.timestep_scaling, **_SAFE,
        )


@dataclass(frozen=True)
class TCDSampler(Sampler):
    """TCD: gamma sampler with gamma = 0.3 (diffusers' ``TCDScheduler``, eta passed to every
    step so a pipeline's default eta = 0 cannot switch it off)."""

    eta: float = 0.3

    def __post_init__(self):
        check_eta(self.eta, "sampler.eta")

    def build(self, scheduler_config):
        return TCDScheduler.from_config(
            dict(scheduler_config), original_inference_steps=self.num_ddim_timesteps, **_SAFE
        )

    def step_kwargs(self):
        return {"eta": self.eta}


@dataclass(frozen=True)
class PCMSampler(Sampler):
    """PCM: deterministic DDIM through the phase edges, top grid point first, ending at 0.

    K steps use the edges of a K-phase split of the grid, so K = num_phases reproduces the
    training edges (N = 50, K = 4: 999, 739, 499, 239 -> 0). ``DDIMScheduler`` cannot take
    custom timesteps (it always steps by T // K), so this runs diffusers' ``TCDScheduler`` with
    eta = 0 on the custom schedule: a DDIM map to the next edge, and to 0 with ``abar[0]``.
    """

    def timesteps(self, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
        grid = DistillationGrid(num_train_timesteps, self.num_ddim_timesteps)
        _, edges = grid.phase_edges(num_steps, "PCM sampler: num_steps")
        return [int(grid.timesteps[-1])] + edges[edges > 0].flip(0).tolist()

    def build(self, scheduler_config):
        return TCDScheduler.from_config(
            dict(scheduler_config), original_inference_steps=self.num_ddim_timesteps, **_SAFE
        )

    def set_timesteps(self, scheduler, num_steps, device=None):
        steps = self.timesteps(num_steps, scheduler.config.num_train_timesteps)
        scheduler.set_timesteps(timesteps=steps, device=device)

    def step_kwargs(self):
        return {"eta": 0.0}


@dataclass(frozen=True)
class DDIMSampler(Sampler):
    """The teacher's reference sampler: deterministic DDIM, "trailing" spacing (starts at 999),
    ending with ``abar[0]`` (``set_alpha_to_one=False``)."""

    def build(self, scheduler_config):
        return DDIMScheduler.from_config(
            dict(scheduler_config), timestep_spacing="trailing", set_alpha_to_one=False, **_SAFE
        )

    def step_kwargs(self):
        return {"eta": 0.0}


@dataclass
class SampleResult:
    """Decoded images in [0, 1] (N x 3 x H x W, float32, CPU) and UNet evaluations per image."""

    images: torch.Tensor
    nfe: int


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _cast(conditioning: Conditioning, device, dtype) -> dict:
    kwargs = conditioning.unet_kwargs()
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].to(device, dtype)
    if "added_cond_kwargs" in kwargs:
        kwargs["added_cond_kwargs"] = {
            k: v.to(device, dtype) for k, v in kwargs["added_cond_kwargs"].items()
        }
    return kwargs


@torch.no_grad()
def _sample_batch(
    unet, pipeline: Teacher, sampler: Sampler, scheduler: SchedulerMixin,
    prompts: list[str], seeds: list[int], num_steps: int, guidance_scale: float, cfg: bool,
    uncond: str = "empty",
) -> torch.Tensor:
    device, dtype = _module_device_dtype(unet)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    conditioning = pipeline.text(prompts)
    if cfg:  # unconditional first, both halves in one UNet call of twice the batch
        empty = (conditioning.zeros_like() if uncond == "zeros"
                 else pipeline.text([""] * len(prompts)))
        conditioning = empty.cat(conditioning)
    kwargs = _cast(conditioning, device, dtype)
    timestep_cond = None
    if unet.config.get("time_cond_proj_dim") is not None:  # w_embed student: w = g - 1
        w = torch.full((len(prompts),), guidance_scale - 1.0)
        timestep_cond = guidance_embedding(w, unet.config.time_cond_proj_dim).to(device, dtype)
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    shape = (len(prompts), unet.config.in_channels, pipeline.resolution // scale,
             pipeline.resolution // scale)
    x = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    sampler.set_timesteps(scheduler, num_steps, device=device)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = unet(torch.cat([x_in] * 2) if cfg else x_in, t, timestep_cond=timestep_cond,
                   **kwargs).sample
        if cfg:  # eps(empty) + g * (eps(c) - eps(empty))
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
        x = scheduler.step(out, t, x, generator=generators, **sampler.step_kwargs()).prev_sample
    vae = pipeline.vae
    image = vae.decode(x.to(vae.dtype) / pipeline.scaling_factor).sample
    return (image.float() * 0.5 + 0.5).clamp(0, 1).cpu()


def generate(
    unet: torch.nn.Module,
    pipeline: Teacher,
    sampler: Sampler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float = 1.0,
    batch_size: int = 16,
    progress: bool = False,
    uncond: str = "empty",
) -> SampleResult:
    """Sample one image per (prompt, seed) with ``unet`` (a student's UNet or the teacher's).

    ``pipeline`` supplies the other parts of the diffusion pipeline: the text encoder, the VAE,
    the noise-schedule config and the resolution (those of the teacher the student came from).

    ``guidance_scale`` g: g = 1 is one UNet pass per step; otherwise ordinary CFG against the
    encoded empty prompt, ``eps(empty) + g * (eps(c) - eps(empty))``, with both halves in one
    UNet call per step (fewer, larger calls; experiments/speed has the measurements); CFG then
    samples ``batch_size // 2`` prompts at a time, so that no network call takes more than
    ``batch_size`` images (with ``batch_size=1``, one image in calls of two). A UNet with a
    guidance projection (``time_cond_proj_dim``, the w_embed students) instead takes
    ``w = g - 1`` as ``timestep_cond`` with one pass, as the diffusers pipelines do.
    (Pipelines skip CFG for g <= 1; here any g != 1 runs it.) ``uncond="zeros"`` takes
    all-zero text embeddings as the unconditional side instead of the encoded "" (the
    ``uncond: zeros`` guidance the student was trained with, and what SDXL pipelines do for an
    empty negative prompt).
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"generate: {len(prompts)} prompts and {len(seeds)} seeds; need the "
                         "same positive number")
    if batch_size < 1:
        raise ValueError(f"generate: batch_size={batch_size} must be >= 1")
    cfg = guidance_scale != 1.0 and unet.config.get("time_cond_proj_dim") is None
    scheduler = sampler.build(pipeline.scheduler_config)
    if cfg:
        batch_size = max(batch_size // 2, 1)  # a CFG call holds the batch twice
    batches = range(0, len(prompts), batch_size)
    images = [
        _sample_batch(
            unet, pipeline, sampler, scheduler, list(prompts[i : i + batch_size]),
            list(seeds[i : i + batch_size]), num_steps, guidance_scale, cfg, uncond,
        )
        for i in tqdm(batches, desc=f"sampling {num_steps} steps", disable=not progress)
    ]
    return SampleResult(torch.cat(images), nfe=num_steps * (2 if cfg else 1))
