"""CLIP score (Hessel et al. 2021) with torchmetrics' scaling, computed with open_clip."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from torch import Tensor, nn

from tdd.metrics.clip_model import CLIPImageFeatures, Tokenizer


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Per-pair score ``100 * max(cos(image, text), 0)``; embeddings need not be normalised."""
    cos = torch.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return 100 * cos.clamp(min=0)


class CLIPScorer(nn.Module):
    """Per-image CLIP score of images in [0, 1] against their prompts; the mean is "CLIP score".

    ``model`` is an open_clip model (``encode_image``/``encode_text``); without a ``tokenizer``
    open_clip's default BPE tokenizer is used at the model's context length.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, batch_size: int = 32):
        super().__init__()
        if tokenizer is None:
            length = open_clip.get_model_tokenize_cfg(model).get("context_length", 77)
            tokenizer = open_clip.SimpleTokenizer(context_length=length)
        self.images = CLIPImageFeatures(model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) scores for N images and their N prompts."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIPScorer: {images.shape[0]} images but {len(prompts)} prompts")
        model, device = self.images.model, self.images.mean.device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            tokens = self.tokenizer(list(prompts[start:stop])).to(device)
            scores.append(clip_score(self.images(images[start:stop]), model.encode_text(tokens)))
        return torch.cat(scores)
