"""Few-step sampling of distilled students: one code path for evaluation and users.

A :class:`Sampler` turns the teacher's scheduler config into the diffusers scheduler of one
method (docs/methods.md section 3); :func:`generate` runs any sampler on any student. Every
image has its own ``torch.Generator`` (seeded by its seed) for its initial latent and for every
step's noise, so image k is the same whatever the batch size or the other prompts in its batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from tdd.embedding import guidance_embedding
from tdd.models.conditioning import Conditioning
from tdd.models.flow import (
    is_transformer,
    pack_latents,
    packs_latents,
    run_transformer,
    unpack_latents,
)
from tdd.models.teacher import Teacher
from tdd.schedule import DistillationGrid, check_eta, is_flow_config
from tdd.schedulers import TDDFlowScheduler, TDDScheduler

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

    def build_flow(self, scheduler_config: Mapping) -> SchedulerMixin:
        """The same method's sampler for a flow student (docs/methods.md 0.2): by default
        :class:`TDDFlowScheduler` on the grid with this sampler's eta."""
        return TDDFlowScheduler.from_config(
            dict(scheduler_config), tdd_train_step=self.num_ddim_timesteps,
            eta=getattr(self, "eta", 0.0), **self.flow_options())

    def flow_options(self) -> dict:
        return {}

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

    def flow_options(self):
        if self.special_jump or self.clip_x0:
            raise ValueError("sampler.special_jump and sampler.clip_x0 are VP options; a flow "
                             "student samples the equidistant grid schedule without clipping")
        return {"k_min": self.k_min, "k_max": self.k_max}

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

    def build_flow(self, scheduler_config):
        """x0 through the boundary scalings, re-noised with fresh noise (eta = 1)."""
        return TDDFlowScheduler.from_config(
            dict(scheduler_config), tdd_train_step=self.num_ddim_timesteps, eta=1.0,
            boundary_timestep_scaling=self.timestep_scaling)


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

    def flow_options(self):
        return {"phase_edges": True}

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

    def build_flow(self, scheduler_config):
        """A flow teacher's own sampler: Euler on its shifted sigmas (as SD3's pipeline)."""
        return FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))

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


def build_scheduler(sampler: Sampler, scheduler_config: Mapping) -> SchedulerMixin:
    """``sampler``'s scheduler for a teacher's config: its flow variant for a flow teacher."""
    if is_flow_config(scheduler_config):
        return sampler.build_flow(scheduler_config)
    return sampler.build(scheduler_config)


def step_kwargs(sampler: Sampler, scheduler: SchedulerMixin) -> dict:
    """The sampler's step arguments that ``scheduler.step`` takes (flow Euler takes no eta)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in sampler.step_kwargs().items() if k in accepted}


def _denoise(unet, x, t, call, timestep_cond, size: int) -> torch.Tensor:
    """One network call as the stock pipelines make it (FLUX: on packed latents)."""
    if not is_transformer(unet):
        return unet(x, t, timestep_cond=timestep_cond, **call).sample
    if packs_latents(unet):
        return pack_latents(run_transformer(unet, unpack_latents(x, size, size), t, call))
    return run_transformer(unet, x, t, call)


@torch.no_grad()
def _sample_batch(
    unet, pipeline: Teacher, sampler: Sampler, scheduler: SchedulerMixin,
    prompts: list[str], seeds: list[int], num_steps: int, guidance_scale: float, cfg: bool,
    uncond: str = "empty",
) -> torch.Tensor:
    device, dtype = _module_device_dtype(unet)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    conditioning = pipeline.text(prompts)
    if unet.config.get("guidance_embeds"):  # FLUX.1-dev: the scale is a transformer input
        scale = torch.full((len(prompts),), float(guidance_scale), device=device)
        conditioning = Conditioning(conditioning.hidden, {**conditioning.added, "guidance": scale})
    flow = is_transformer(unet)  # a flow transformer takes the Conditioning itself
    calls = [conditioning if flow else _cast(conditioning, device, dtype)]
    if cfg:  # unconditional first; a UNet call each, so no call exceeds the batch size
        empty = (conditioning.zeros_like() if uncond == "zeros"
                 else pipeline.text([""] * len(prompts)))
        calls.insert(0, empty if flow else _cast(empty, device, dtype))
    timestep_cond = None
    if unet.config.get("time_cond_proj_dim") is not None:  # w_embed student: w = g - 1
        w = torch.full((len(prompts),), guidance_scale - 1.0)
        timestep_cond = guidance_embedding(w, unet.config.time_cond_proj_dim).to(device, dtype)
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    size = pipeline.resolution // scale
    channels = pipeline.vae.config.latent_channels if flow else unet.config.in_channels
    x = randn_tensor((len(prompts), channels, size, size), generator=generators, device=device,
                     dtype=dtype)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow Euler has none (1)
    if packs_latents(unet):  # FLUX samples on packed latents, as its pipeline does
        x = pack_latents(x)
    if flow:  # flow schedulers carry their schedule in their config; FLUX's mu
        scheduler.set_timesteps(num_steps, device=device, mu=pipeline.mu)
    else:
        sampler.set_timesteps(scheduler, num_steps, device=device)
    kwargs = step_kwargs(sampler, scheduler)
    for t in scheduler.timesteps:
        x_in = x if flow else scheduler.scale_model_input(x, t)
        out = [_denoise(unet, x_in, t, call, timestep_cond, size) for call in calls]
        # CFG: eps(empty) + g * (eps(c) - eps(empty))
        out = out[0] + guidance_scale * (out[1] - out[0]) if cfg else out[0]
        x = scheduler.step(out, t, x, generator=generators, **kwargs).prev_sample
    if packs_latents(unet):
        x = unpack_latents(x, size, size)
    vae = pipeline.vae
    latents = x.to(vae.dtype) / pipeline.scaling_factor
    if pipeline.shift_factor:  # SD3 / FLUX VAEs
        latents = latents + pipeline.shift_factor
    image = vae.decode(latents).sample
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
    encoded empty prompt, ``eps(empty) + g * (eps(c) - eps(empty))``, in two UNet calls per
    step, so that no network call takes more than ``batch_size`` images (nor does the VAE
    decode, when the teacher's VAE slices). A UNet with a guidance projection
    (``time_cond_proj_dim``, the w_embed students) instead takes ``w = g - 1`` as
    ``timestep_cond`` with one pass, as the diffusers pipelines do. (Pipelines skip CFG for
    g <= 1; here any g != 1 runs it.) ``uncond="zeros"`` takes all-zero text embeddings as the
    unconditional side instead of the encoded "" (the ``uncond: zeros`` guidance the student
    was trained with, and what SDXL pipelines do for an empty negative prompt).
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"generate: {len(prompts)} prompts and {len(seeds)} seeds; need the "
                         "same positive number")
    if batch_size < 1:
        raise ValueError(f"generate: batch_size={batch_size} must be >= 1")
    embedded = unet.config.get("time_cond_proj_dim") is not None or unet.config.get(
        "guidance_embeds", False)  # w_embed students and FLUX.1-dev take g as an input
    cfg = guidance_scale != 1.0 and not embedded
    scheduler = build_scheduler(sampler, pipeline.scheduler_config)
    batches = range(0, len(prompts), batch_size)
    images = [
        _sample_batch(
            unet, pipeline, sampler, scheduler, list(prompts[i : i + batch_size]),
            list(seeds[i : i + batch_size]), num_steps, guidance_scale, cfg, uncond,
        )
        for i in tqdm(batches, desc=f"sampling {num_steps} steps", disable=not progress)
    ]
    return SampleResult(torch.cat(images), nfe=num_steps * (2 if cfg else 1))
