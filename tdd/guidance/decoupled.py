"""Decoupled guidance (TDD): empty prompts in training keep CFG tunable at inference."""

from __future__ import annotations

from tdd.guidance.base import Guidance


class DecoupledGuidance(Guidance):
    """Fixed teacher scale ``w`` (LCM form) and a share of empty prompts (docs/methods.md 2).

    At inference the student runs ordinary CFG against the empty prompt at any scale g; g = 1
    is the distilled guidance (effective teacher scale about g * (1 + w)).
    """

    inference_scales = (1.0, 1.7)

    def __init__(self, w: float = 3.5, empty_prompt_share: float = 0.2, uncond: str = "empty"):
        super().__init__(w, w, empty_prompt_share, uncond)
