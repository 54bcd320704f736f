"""Classifier-free guidance distilled into the student (LCM-LoRA, PCM "smallCFG")."""

from __future__ import annotations

from tdd.guidance.base import Guidance


class CFGGuidance(Guidance):
    """Teacher guided with ``w ~ U[w_min, w_max]`` (LCM form), no prompt dropout; g = 1 at
    inference."""

    def __init__(self, w_min: float = 5.0, w_max: float = 15.0, uncond: str = "empty"):
        super().__init__(w_min, w_max, 0.0, uncond)
