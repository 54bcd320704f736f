"""TDDScheduler: the gamma (eta) sampler of TCD and TDD as a drop-in diffusers scheduler.

docs/methods.md section 3. At step i with prediction (x0, eps) at timestep t, the next timestep t'
(0 after the last step) and ``s = floor((1 - eta) * t')``: DDIM-map the prediction to s, then,
unless this is the last step or eta = 0, forward-diffuse s -> t' with fresh noise.

The last step returns the DDIM map to timestep 0 evaluated with ``abar[0]`` (not 1), exactly as
diffusers' ``TCDScheduler`` does and as the training targets at s = 0 are built; with eta = 0 the
whole chain equals ``DDIMScheduler(set_alpha_to_one=False)`` on the same timesteps. (The TDD
release ends at sigma = 0 instead; the difference is ``sqrt(1 - abar[0]) * eps``, about 0.03 eps.
The clean ``x0`` of every step is returned as ``denoised``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from tdd.prediction import PREDICTION_TYPES, ddim_map, renoise, to_x0_eps
from tdd.schedule import DistillationGrid, NoiseSchedule, check_eta
from tdd.schedulers.bookkeeping import StepBookkeeping

logger = logging.get_logger(__name__)

#: Non-equidistant schedules published with TDD, keyed by (grid size N, steps K).
PUBLISHED_SCHEDULES: dict[tuple[int, int], tuple[int, ...]] = {
    (250, 5): (999, 875, 751, 499, 251),
    (250, 6): (999, 875, 751, 627, 499, 251),
    (250, 7): (999, 875, 751, 627, 499, 375, 251),
}

Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class TDDSchedulerOutput(BaseOutput):
    """``prev_sample``: the input of the next step (the final latent after the last step);
    ``denoised``: the clean-latent prediction x0 of this step."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def gamma_target(next_timestep: int, eta: float) -> int:
    """Gamma-sampler timestep ``s = floor((1 - eta) * t')`` (Zheng et al. 2024, TCD)."""
    return math.floor((1.0 - eta) * next_timestep)


class TDDScheduler(StepBookkeeping, SchedulerMixin, ConfigMixin):
    """Gamma sampler on the distillation grid of a TDD student (Wang et al. 2024, TDD).

    Config: the teacher's noise schedule (``num_train_timesteps, beta_*, trained_betas,
    prediction_type``), ``tdd_train_step`` (grid size N), ``special_jump`` (published
    non-equidistant schedules for K = 5, 6, 7 on N = 250), ``eta`` (used when ``step`` gets
    ``eta=None``), ``clip_x0`` + ``clip_steps`` (clamp x0 to [-1, 1] on the first ``clip_steps``
    steps, i.e. ``t_l + 1`` of docs/methods.md section 3), and ``k_min, k_max`` (the trained
    candidate set M that custom timesteps must come from). ``from_config`` accepts any SD / SDXL
    scheduler config.

    Stock diffusers pipelines call ``step`` with ``eta=0.0`` unless they are called with
    ``eta=...``: pass the eta you want (``pipe(..., eta=0.2)``), or sampling is plain DDIM.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        tdd_train_step: int = 250,
        special_jump: bool = False,
        eta: float = 0.2,
        clip_x0: bool = False,
        clip_steps: int = 1,
        k_min: int = 4,
        k_max: int = 8,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type={prediction_type!r}; expected one of "
                f"{PREDICTION_TYPES}"
            )
        check_eta(eta, "scheduler eta")
        if clip_steps < 0:
            raise ValueError(f"scheduler clip_steps={clip_steps} must be >= 0")
        self.noise_schedule = NoiseSchedule.from_config(self.config)
        self.alphas_cumprod = self.noise_schedule.alphas_cumprod
        self.grid = DistillationGrid(num_train_timesteps, tdd_train_step)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = self.grid.timesteps.flip(0).clone()
        self._trained: torch.Tensor | None = None
        self._warned_zero_eta = False

    # --- timesteps ------------------------------------------------------------------------

    @property
    def trained_timesteps(self) -> torch.Tensor:
        """M ∪ {grid top}: every timestep a TDD student was trained to jump from or to."""
        if self._trained is None:
            candidates = self.grid.tdd_candidates(self.config.k_min, self.config.k_max)
            top = self.grid.timesteps[-1:]
            self._trained = torch.unique(torch.cat([candidates, top]))
        return self._trained

    def schedule(self, num_inference_steps: int) -> torch.Tensor:
        """The K-step schedule: a published one under ``special_jump``, else the equidistant
        ``grid_desc[floor(linspace(0, N, K))]``."""
        key = (self.config.tdd_train_step, num_inference_steps)
        if self.config.special_jump and key in PUBLISHED_SCHEDULES:
            return torch.tensor(PUBLISHED_SCHEDULES[key], dtype=torch.long)
        return self.grid.schedule(num_inference_steps)

    def check_timesteps(self, timesteps: list[int] | torch.Tensor) -> torch.Tensor:
        """Validate a custom schedule: strictly descending, every point in M ∪ {grid top}."""
        values = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).cpu()
        if values.numel() == 0:
            raise ValueError("custom timesteps must not be empty")
        if values.numel() > 1 and not bool((values[1:] < values[:-1]).all()):
            raise ValueError(f"custom timesteps {values.tolist()} must be strictly descending")
        allowed = set(self.trained_timesteps.tolist())
        bad = [t for t in values.tolist() if t not in allowed]
        if bad:
            raise ValueError(
                f"custom timestep(s) {bad} lie outside the trained set of tdd_train_step="
                f"{self.config.tdd_train_step} (k_min={self.config.k_min}, k_max="
                f"{self.config.k_max}); allowed: {sorted(allowed)}"
            )
        return values

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Set the K-step schedule (``num_inference_steps``) or a custom one (``timesteps``)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps, timesteps")
        if timesteps is not None:
            schedule = self.check_timesteps(timesteps)
        else:
            schedule = self.schedule(int(num_inference_steps))
        self.timesteps = schedule.to(device=device, dtype=torch.long)
        self.num_inference_steps = len(schedule)
        self.reset_steps()
        self._warned_zero_eta = False

    # --- the sampler ----------------------------------------------------------------------

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Forward diffusion ``x_t = a_t x0 + s_t noise`` (img2img pipelines)."""
        t = torch.as_tensor(timesteps).reshape(-1).cpu()
        return self.noise_schedule.add_noise(original_samples, noise, t)

    def predict(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, clip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) at ``timestep``; with ``clip`` x0 is clamped to [-1, 1] and eps recomputed
        from it, so the DDIM map keeps ``x_t`` (the first-order DPM-Solver++ form of the TDD
        release)."""
        t = torch.tensor([int(timestep)])
        alpha, sigma = self.noise_schedule.coefficients(t, sample)
        x0, eps = to_x0_eps(model_output, sample, alpha, sigma, self.config.prediction_type)
        if clip:
            x0, eps = to_x0_eps(x0.clamp(-1.0, 1.0), sample, alpha, sigma, "sample")
        return x0, eps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> TDDSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One gamma-sampler step from ``timestep`` (docs/methods.md section 3).

        ``eta=None`` uses the configured eta. ``generator`` may be a list with one generator per
        sample, so each image's noise is independent of the batch it is in; ``None`` draws from
        torch's default generator (the diffusers convention).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        eta = self._resolve_eta(eta)
        index = self.advance(timestep)
        last = index + 1 >= len(self.timesteps)
        t_next = 0 if last else int(self.timesteps[index + 1])
        s = gamma_target(t_next, eta)
        # 1. Prediction (x0, eps) at t, x0 optionally clamped on the first clip_steps steps.
        clip = self.config.clip_x0 and index < self.config.clip_steps
        x0, eps = self.predict(model_output, timestep, sample, clip)
        # 2. DDIM map to s = floor((1 - eta) t'); abar[0] at s = 0.
        x_s = ddim_map(x0, eps, torch.tensor([s]), self.noise_schedule)
        # 3. Re-noise s -> t' with fresh noise, except after the last step or when eta = 0.
        prev_sample = x_s
        if not last and s < t_next:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device,
                                 dtype=sample.dtype)
            prev_sample = renoise(x_s, torch.tensor([s]), torch.tensor([t_next]),
                                  self.noise_schedule, noise)
        if not return_dict:
            return prev_sample, x0
        return TDDSchedulerOutput(prev_sample=prev_sample, denoised=x0)

    def _resolve_eta(self, eta: float | None) -> float:
        if eta is None:
            return float(self.config.eta)
        eta = check_eta(float(eta), "step eta")
        if eta == 0.0 and self.config.eta > 0.0 and not self._warned_zero_eta:
            self._warned_zero_eta = True
            logger.warning(
                f"TDDScheduler.step got eta=0 while the scheduler's eta is {self.config.eta}: "
                "sampling is deterministic DDIM. Diffusers pipelines pass eta=0.0 unless called "
                "with eta=...; pass it explicitly."
            )
        return eta

