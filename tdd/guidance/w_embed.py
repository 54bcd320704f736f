"""w_embed guidance: the student takes w as ``timestep_cond`` (full-model LCM, Luo et al. 2023)."""

from __future__ import annotations

from tdd.embedding import guidance_embedding
from tdd.guidance.base import Guidance


class WEmbedGuidance(Guidance):
    """``w ~ U[w_min, w_max]`` per sample, given to the student as ``timestep_cond``.

    Needs a student UNet with ``time_cond_proj_dim = embedding_dim`` (``student=full`` adds one).
    """

    embeds_w = True

    def __init__(
        self, w_min: float = 3.0, w_max: float = 15.0, embedding_dim: int = 256,
        uncond: str = "empty",
    ):
        super().__init__(w_min, w_max, 0.0, uncond)
        if embedding_dim <= 0 or embedding_dim % 2:
            raise ValueError(f"guidance.embedding_dim={embedding_dim} must be positive and even")
        self.embedding_dim = self.condition_dim = embedding_dim
        self.inference_scales = (1.0 + (w_min + w_max) / 2,)  # w is chosen freely at inference

    def student_condition(self, w):
        return guidance_embedding(w, self.embedding_dim)
