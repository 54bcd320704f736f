"""Guidance modes: how the teacher is guided and what the student is conditioned on."""

from __future__ import annotations

import torch

from tdd.schedule import append_dims


def combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Guided prediction in the LCM form ``p_w = p_c + w * (p_c - p_u)``.

    LCM-form ``w`` equals the diffusers / Imagen guidance scale minus one: ``g = w + 1``.
    """
    w = append_dims(w, cond.ndim).to(cond)
    return cond + w * (cond - uncond)


class Guidance:
    """Teacher guidance with a per-sample scale ``w ~ U[w_min, w_max]`` (LCM form).

    ``empty_prompt_share`` of the captions is replaced by "" before encoding; that embedding feeds
    the student, the conditional teacher pass and the target. ``uncond`` picks the teacher's
    unconditional embedding: the encoded "" (``empty``) or all zeros (``zeros``, the SDXL scripts).
    With ``w_max == 0`` the teacher runs the conditional pass only.
    """

    #: True when the student must take ``w`` as ``timestep_cond`` (a UNet guidance projection).
    embeds_w: bool = False
    #: Width of that ``timestep_cond`` (the UNet's ``time_cond_proj_dim``); None without one.
    condition_dim: int | None = None
    #: Diffusers-form scales g the student is evaluated at (g = 1: the distilled guidance alone).
    inference_scales: tuple[float, ...] = (1.0,)

    def __init__(
        self,
        w_min: float = 0.0,
        w_max: float = 0.0,
        empty_prompt_share: float = 0.0,
        uncond: str = "empty",
    ):
        if not 0.0 <= w_min <= w_max:
            raise ValueError(f"guidance: need 0 <= w_min ({w_min}) <= w_max ({w_max})")
        if not 0.0 <= empty_prompt_share <= 1.0:
            raise ValueError(f"guidance.empty_prompt_share={empty_prompt_share} outside [0, 1]")
        if uncond not in ("empty", "zeros"):
            raise ValueError(f"guidance.uncond={uncond!r}; expected 'empty' or 'zeros'")
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.empty_prompt_share = float(empty_prompt_share)
        self.uncond = uncond

    @property
    def uses_uncond(self) -> bool:
        """Whether the teacher needs an unconditional pass at all."""
        return self.w_max > 0

    def drop_captions(self, captions: list[str], generator: torch.Generator | None = None):
        """Replace a share of captions by the empty prompt."""
        keep = torch.rand(len(captions), generator=generator) >= self.empty_prompt_share
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def sample_w(self, batch_size: int, generator: torch.Generator | None = None):
        """Per-sample teacher guidance scale (LCM form)."""
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return (self.w_min + u * (self.w_max - self.w_min)).float()

    @property
    def teacher_scale(self) -> float:
        """The diffusers-form scale the student was distilled towards: ``1 + mean(w)``."""
        return 1.0 + (self.w_min + self.w_max) / 2

    def attach(self, conditioning, w: torch.Tensor):
        """The conditioning every network of the step takes (embedded guidance adds w)."""
        return conditioning

    def student_condition(self, w: torch.Tensor) -> torch.Tensor | None:
        """The ``timestep_cond`` the student (and target) take; None unless w is embedded."""
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(w=[{self.w_min}, {self.w_max}], "
            f"empty_prompt_share={self.empty_prompt_share}, uncond={self.uncond!r})"
        )

    def unconditional(self, cond, empty_conditioning):
        """The teacher's unconditional embedding: encoded "" or zeros (``uncond`` setting)."""
        if self.uncond == "zeros":
            return cond.zeros_like()
        return empty_conditioning(len(cond))
