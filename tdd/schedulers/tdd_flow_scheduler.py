"""TDDFlowScheduler: the gamma (eta) sampler for students of rectified-flow teachers.

docs/methods.md sections 0.2 and 3. The schedule is a set of indices into the teacher's T training
timesteps (the distillation grid, as for VP students); each index t has the teacher's sigma[t]
(with its shift, or FLUX's resolution shift mu) and the model timestep ``sigma[t] * T``. At step i
with the velocity v at index t, the next index t' and ``s = floor((1 - eta) * t')``: the DDIM
map of (x0, eps) to s (the Euler step ``x + (sigma_s - sigma_t) v``), then, unless this is the
last step or eta = 0, the forward process s -> t' with fresh noise. The last step goes to
sigma = 0 (x0), so with eta = 0 the chain is FlowMatchEulerDiscreteScheduler's Euler sampler on
the same sigmas.

A drop-in for stock ``FluxPipeline`` / ``StableDiffusion3Pipeline``: ``set_timesteps`` takes
their ``(num_inference_steps, device, sigmas, mu, timesteps)`` call; of the ``sigmas`` they pass
only the count is used (the grid decides the sigmas). Those pipelines pass neither ``eta`` nor
``generator`` to ``step``: eta comes from the config, and the noise of eta > 0 from
``scheduler.generator`` when it is set (e.g. the generators given to the pipeline), else from
torch's default generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from tdd.boundary import lcm_scalings
from tdd.prediction import ddim_map, renoise, to_x0_eps
from tdd.schedule import DistillationGrid, FlowSchedule, check_eta, flow_sigmas
from tdd.schedulers.bookkeeping import StepBookkeeping
from tdd.schedulers.tdd_scheduler import gamma_target

Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class TDDFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: the next step's input (the final latent after the last step);
    ``denoised``: this step's clean-latent prediction x0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TDDFlowScheduler(StepBookkeeping, SchedulerMixin, ConfigMixin):
    """Gamma sampler on the distillation grid of a flow student (TDD, TCD, PCM, LCM on flow).

    Config: the teacher's flow schedule (``num_train_timesteps, shift, use_dynamic_shifting,
    base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type``; so
    ``from_config`` takes a FlowMatchEulerDiscreteScheduler config), ``tdd_train_step`` (grid
    size N), ``eta``, ``k_min, k_max`` (the trained candidate set custom timesteps must come
    from), ``phase_edges`` (PCM: the K-step schedule runs through the edges of a K-phase split)
    and ``boundary_timestep_scaling`` (LCM: x0 through the boundary scalings, None = off).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        tdd_train_step: int = 250,
        eta: float = 0.2,
        k_min: int = 4,
        k_max: int = 8,
        phase_edges: bool = False,
        boundary_timestep_scaling: float | None = None,
        boundary_sigma_data: float = 0.5,
    ):
        check_eta(eta, "scheduler eta")
        self.grid = DistillationGrid(num_train_timesteps, tdd_train_step)
        self.init_noise_sigma = 1.0
        self.generator: Generators = None
        self.num_inference_steps: int | None = None
        self.flow: FlowSchedule | None = None
        self.indices = self.timesteps = self.sigmas = None

    # --- timesteps ------------------------------------------------------------------------
    def schedule(self, num_inference_steps: int) -> torch.Tensor:
        """The K grid indices: equidistant ``grid_desc[floor(linspace(0, N, K))]``, or with
        ``phase_edges`` the grid top then the non-zero edges of a K-phase split (PCM)."""
        if not self.config.phase_edges:
            return self.grid.schedule(num_inference_steps)
        _, edges = self.grid.phase_edges(num_inference_steps, "PCM sampler: num_steps")
        return torch.cat([self.grid.timesteps[-1:], edges[edges > 0].flip(0)])

    def check_timesteps(self, timesteps) -> torch.Tensor:
        """A custom schedule of indices: strictly descending, in M ∪ {grid top}."""
        values = torch.as_tensor(timesteps).reshape(-1).long().cpu()
        allowed = set(self.grid.tdd_candidates(self.config.k_min, self.config.k_max).tolist())
        allowed.add(int(self.grid.timesteps[-1]))
        descending = values.numel() > 0 and bool((values[1:] < values[:-1]).all())
        bad = [t for t in values.tolist() if t not in allowed]
        if not descending or bad:
            raise ValueError(f"custom timesteps {values.tolist()} must be strictly descending "
                             f"indices of the trained set {sorted(allowed)}")
        return values

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Set the K-step schedule. K is ``num_inference_steps``, else ``len(sigmas)`` (what the
        stock pipelines pass); ``timesteps`` gives custom indices into the T training timesteps
        instead; ``mu`` is FLUX's resolution shift (needed with ``use_dynamic_shifting``)."""
        if timesteps is not None:
            indices = self.check_timesteps(timesteps)
        else:
            count = num_inference_steps if num_inference_steps is not None else (
                None if sigmas is None else len(sigmas))
            if count is None:
                raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
            indices = self.schedule(int(count))
        self.flow = FlowSchedule(flow_sigmas(self.config, mu))
        sigma = self.flow.sigmas[indices].float()
        self.indices = indices
        self.timesteps = (sigma * self.config.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigma, torch.zeros(1)]).to(device)
        self.num_inference_steps = len(indices)
        self.reset_steps()

    def scale_noise(self, sample, timestep, noise):
        """Forward process ``(1 - sigma) x0 + sigma noise`` at a schedule timestep (img2img)."""
        sigma = self.sigmas[self.index_for_timestep(timestep)].to(sample)
        return (1 - sigma) * sample + sigma * noise

    # --- the sampler ----------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> TDDFlowSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One gamma-sampler step from ``timestep`` (a value of ``self.timesteps``)."""
        if self.indices is None:
            raise ValueError("call set_timesteps before step")
        eta = float(self.config.eta) if eta is None else check_eta(float(eta), "step eta")
        index, dtype = self.advance(timestep), model_output.dtype
        x, v = sample.float(), model_output.float()
        t = self.indices[index : index + 1]
        # 1. Prediction (x0, eps) at t; LCM students through the boundary scalings.
        x0, eps = to_x0_eps(v, x, *self.flow.coefficients(t, x), "flow_prediction")
        if self.config.boundary_timestep_scaling is not None:
            c_skip, c_out = (c.to(x) for c in lcm_scalings(
                t, self.config.boundary_sigma_data, self.config.boundary_timestep_scaling))
            x0 = c_skip * x + c_out * x0
        if index + 1 >= len(self.indices):  # 2. the last step ends at sigma = 0
            prev_sample = x0
        else:  # 2. DDIM (Euler) map to s = floor((1 - eta) t'), 3. re-noise s -> t'
            t_next = self.indices[index + 1 : index + 2]
            s = torch.tensor([gamma_target(int(t_next), eta)])
            prev_sample = ddim_map(x0, eps, s, self.flow)
            if int(s) < int(t_next):
                noise = randn_tensor(x.shape, generator=generator or self.generator,
                                     device=x.device, dtype=x.dtype)
                prev_sample = renoise(prev_sample, s, t_next, self.flow, noise)
        prev_sample = prev_sample.to(dtype)
        if not return_dict:
            return prev_sample, x0
        return TDDFlowSchedulerOutput(prev_sample=prev_sample, denoised=x0)
