"""No teacher guidance: conditional prediction only (PCM "normalCFG")."""

from __future__ import annotations

from tdd.guidance.base import Guidance


class NoGuidance(Guidance):
    """Teacher uses the conditional prediction only; a share of empty prompts keeps CFG usable."""

    def __init__(self, empty_prompt_share: float = 0.1):
        super().__init__(0.0, 0.0, empty_prompt_share, "empty")
