"""``metrics=toy``: the shipped toy evaluator (small open_clip CLIP + detail head) as a suite."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tdd.metrics.aesthetic import AestheticScorer
from tdd.metrics.clip_model import CLIPImageFeatures, load_clip_folder
from tdd.metrics.clip_score import CLIPScorer
from tdd.metrics.fid import FIDScorer
from tdd.metrics.files import require_file
from tdd.metrics.suite import MetricSuite
from tdd.toy.evaluator import CHECKPOINT, DETAIL_HEAD, ToyEvaluator, detail_head


class AttributeAccuracy(nn.Module):
    """Per image, the share of caption attributes (shape, colour, size, texture, position,
    background) for which the true caption beats every one-attribute change, zero-shot."""

    def __init__(self, evaluator: ToyEvaluator):
        super().__init__()
        self.evaluator = evaluator
        self.model = evaluator.model  # registered, so the suite's .to(device) moves it

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.evaluator.attribute_hits(images, list(prompts)).float().mean(1)


def toy_metrics(evaluator: str | Path, batch_size: int = 256) -> MetricSuite:
    """FID on the toy CLIP's image features, CLIP score, detail score (key ``aesthetic``) and
    attribute accuracy, from the evaluator folder (``make toy-assets`` builds it)."""
    folder = Path(str(evaluator))
    for name in ("open_clip_config.json", CHECKPOINT, DETAIL_HEAD):
        require_file(folder / name, "metrics.evaluator")
    model, tokenizer = load_clip_folder(folder, "metrics.evaluator")
    head = detail_head(model.visual.output_dim)
    head.load_state_dict({k: v.float() for k, v in load_file(folder / DETAIL_HEAD).items()})
    head.eval().requires_grad_(False)
    features = CLIPImageFeatures(model)  # raw embeddings: the FID and detail-head input
    return MetricSuite(
        fid=FIDScorer(features, batch_size),
        scorers={
            "clip": CLIPScorer(model, tokenizer, batch_size),
            "aesthetic": AestheticScorer(features, head, batch_size, normalize=False),
            "attribute_acc": AttributeAccuracy(ToyEvaluator(model, tokenizer, head, batch_size)),
        },
    )
