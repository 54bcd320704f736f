"""Guidance modes (docs/methods.md section 2)."""

from tdd.embedding import guidance_embedding
from tdd.guidance.base import Guidance, combine
from tdd.guidance.cfg import CFGGuidance
from tdd.guidance.decoupled import DecoupledGuidance
from tdd.guidance.embedded import EmbeddedGuidance
from tdd.guidance.none import NoGuidance
from tdd.guidance.w_embed import WEmbedGuidance

__all__ = [
    "Guidance", "combine", "DecoupledGuidance", "EmbeddedGuidance", "CFGGuidance",
    "WEmbedGuidance", "NoGuidance", "guidance_embedding",
]
