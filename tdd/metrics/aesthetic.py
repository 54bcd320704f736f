"""Aesthetic score: the LAION "improved aesthetic predictor" head on CLIP image embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdd.metrics.files import require_file


class AestheticPredictor(nn.Module):
    """MLP from an L2-normalised CLIP image embedding to a score (LAION: 1-10, ViT-L/14 input).

    Linear layers with Dropout after the first three and no activations, in a Sequential named
    ``layers``: the state_dict names and shapes of the published head, so it loads unchanged.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        hidden: Sequence[int] = (1024, 128, 64, 16),
        dropout: Sequence[float] = (0.2, 0.2, 0.1),
    ):
        super().__init__()
        widths = (embed_dim, *hidden, 1)
        blocks: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            blocks.append(nn.Linear(width_in, width_out))
            if i < len(dropout):
                blocks.append(nn.Dropout(dropout[i]))
        self.layers = nn.Sequential(*blocks)

    def forward(self, embeddings: Tensor) -> Tensor:
        """(N, D) embeddings (normalise them first) -> (N,) scores."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def load(cls, path: str | Path, setting: str = "metrics.aesthetic_head") -> AestheticPredictor:
        """The head from a state_dict file (strict: every name and shape must match)."""
        file = require_file(path, setting)
        state = torch.load(file, map_location="cpu", weights_only=True)
        if "layers.0.weight" not in state:
            raise ValueError(f"{setting}: {file} is not an aesthetic head (no 'layers.0.weight')")
        head = cls(embed_dim=state["layers.0.weight"].shape[1])
        head.load_state_dict(state, strict=True)
        return head.eval().requires_grad_(False)


class AestheticScorer(nn.Module):
    """Per-image score of images in [0, 1]: encoder -> L2-normalise -> head.

    ``encoder`` maps images to embeddings (``CLIPImageFeatures`` of a CLIP ViT-L/14 for the LAION
    head); prompts are accepted and ignored, so it scores like every other per-image metric. Any
    head mapping (N, D) -> (N,) or (N, 1) fits: the toy detail head takes raw embeddings
    (``normalize=False``).
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module, batch_size: int = 32, normalize: bool = True
    ):
        super().__init__()
        self.encoder = encoder.eval()
        self.head = head.eval()
        self.batch_size = batch_size
        self.normalize = normalize

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        scores = []
        for chunk in images.split(self.batch_size):
            embeddings = self.encoder(chunk).float()
            if self.normalize:
                embeddings = F.normalize(embeddings, dim=-1)
            scores.append(self.head(embeddings).reshape(len(chunk)))
        return torch.cat(scores).float()
