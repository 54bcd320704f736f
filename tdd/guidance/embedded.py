"""Embedded guidance: the guidance scale is an input of a guidance-distilled transformer."""

from __future__ import annotations

import torch

from tdd.guidance.base import Guidance
from tdd.models.conditioning import Conditioning


class EmbeddedGuidance(Guidance):
    """FLUX.1-dev's guidance (docs/methods.md 2): the scale ``g ~ U[scale_min, scale_max]`` (the
    pipeline's ``guidance_scale``, not the LCM form) is a transformer input, given alike to the
    teacher, the student and the target; the teacher runs once, on the conditional prompt. At
    inference the student takes any g the same way.
    """

    embeds_scale = True

    def __init__(self, scale_min: float = 3.5, scale_max: float = 3.5,
                 empty_prompt_share: float = 0.0):
        super().__init__(0.0, 0.0, empty_prompt_share, "empty")  # no unconditional pass
        if not 0.0 <= scale_min <= scale_max:
            raise ValueError(f"guidance: need 0 <= scale_min ({scale_min}) <= scale_max "
                             f"({scale_max})")
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.inference_scales = ((self.scale_min + self.scale_max) / 2,)

    @property
    def teacher_scale(self) -> float:
        return self.inference_scales[0]

    def sample_w(self, batch_size: int, generator: torch.Generator | None = None):
        """Per-sample guidance scale g, the transformer's guidance input."""
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return (self.scale_min + u * (self.scale_max - self.scale_min)).float()

    def attach(self, conditioning: Conditioning, w: torch.Tensor) -> Conditioning:
        guidance = w.to(conditioning.hidden.device)
        return Conditioning(conditioning.hidden, {**conditioning.added, "guidance": guidance})

    def __repr__(self) -> str:
        return (f"EmbeddedGuidance(scale=[{self.scale_min}, {self.scale_max}], "
                f"empty_prompt_share={self.empty_prompt_share})")
