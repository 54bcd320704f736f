"""``metrics=toy``: the shipped toy evaluator, a small open_clip CLIP and a detail head on it.

The evaluator folder (``tdd/assets/toy/evaluator/``; ``python -m tdd.toy.build evaluator``
rebuilds it) holds ``open_clip_config.json`` (open_clip's local-dir format: ``model_cfg`` +
``preprocess_cfg``), ``open_clip_model.safetensors`` and ``detail_head.safetensors``. Plain
open_clip loads the CLIP part: ``open_clip.create_model_and_transforms("local-dir:<folder>")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tdd.config import asset_path
from tdd.data.shapes import ATTRIBUTES, alternatives, parse_caption
from tdd.metrics.aesthetic import AestheticScorer
from tdd.metrics.clip_model import CLIPImageFeatures, load_clip_folder
from tdd.metrics.clip_score import CLIPScorer
from tdd.metrics.fid import FIDScorer, module_device
from tdd.metrics.files import require_file
from tdd.metrics.kid import check_kid_settings
from tdd.metrics.sharpness import Sharpness
from tdd.metrics.suite import MetricSuite

EVALUATOR_DIR = Path(asset_path("toy/evaluator"))
CHECKPOINT = "open_clip_model.safetensors"
DETAIL_HEAD = "detail_head.safetensors"


def detail_head(embed_dim: int) -> nn.Module:
    """Detail score from the unnormalized image embedding (1 = sharp render)."""
    return nn.Sequential(nn.Linear(embed_dim, 64), nn.GELU(), nn.Linear(64, 1))


class ToyEvaluator:
    """Zero-shot attribute accuracy, CLIP score and detail score of images in [0, 1].

    Image features, the CLIP-score formula and the detail score are those of the metric suite
    (:class:`CLIPImageFeatures`, :class:`CLIPScorer`, :class:`AestheticScorer`): the quality
    record of the builders and the runs score alike.
    """

    def __init__(self, model: nn.Module, tokenizer, head: nn.Module, batch_size: int = 500):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.features = CLIPImageFeatures(model)  # raw embeddings: FID and detail-head input
        self.clip = CLIPScorer(model, tokenizer, batch_size)
        self.detail = AestheticScorer(self.features, head, batch_size, normalize=False)
        self._text_cache: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return module_device(self.features)

    @torch.no_grad()
    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(N, D) image embeddings; ``normalize=False`` gives the FID features."""
        feats = torch.cat([self.features(chunk) for chunk in images.split(self.batch_size)])
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> Tensor:
        """(N, D) normalized text embeddings (cached per caption)."""
        todo = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            feats = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            for caption, f in zip(chunk, nn.functional.normalize(feats, dim=-1)):
                self._text_cache[caption] = f
        return torch.stack([self._text_cache[c] for c in captions])

    def clip_score(self, images: Tensor, captions: list[str]) -> Tensor:
        """(N,) CLIP score of each image with its caption (the suite's ``clip``)."""
        return self.clip(images, captions)

    def detail_score(self, images: Tensor) -> Tensor:
        """(N,) detail/sharpness score: about 1 for clean renders, lower with blur or noise."""
        return self.detail(images)

    @torch.no_grad()
    def attribute_hits(self, images: Tensor, scenes: list) -> Tensor:
        """(N, len(ATTRIBUTES)) bool: the true caption beats every one-attribute change."""
        specs = [parse_caption(s) if isinstance(s, str) else s for s in scenes]
        feats = self.image_features(images)
        hits = torch.zeros(len(specs), len(ATTRIBUTES), dtype=torch.bool)
        for i, spec in enumerate(specs):
            groups = [[spec]] + [alternatives(spec, a) for a in ATTRIBUTES]
            texts = self.text_features([s.caption for g in groups for s in g])
            sims = texts @ feats[i]
            start = 1
            for j, group in enumerate(groups[1:]):
                hits[i, j] = sims[0] > sims[start:start + len(group)].max()
                start += len(group)
        return hits

    def attribute_accuracy(self, images: Tensor, scenes: list) -> dict[str, float]:
        """Accuracy per attribute, their ``mean`` and ``all`` (every attribute right)."""
        hits = self.attribute_hits(images, scenes)
        result = {a: float(hits[:, j].float().mean()) for j, a in enumerate(ATTRIBUTES)}
        result["mean"] = float(hits.float().mean())
        result["all"] = float(hits.all(1).float().mean())
        return result


def load_toy_evaluator(
    folder: str | Path = EVALUATOR_DIR, batch_size: int = 500, setting: str = "metrics.evaluator"
) -> ToyEvaluator:
    """The evaluator in ``folder``; a missing file is an error naming ``setting``."""
    folder = Path(str(folder))
    for name in ("open_clip_config.json", CHECKPOINT, DETAIL_HEAD):
        require_file(folder / name, setting)
    model, tokenizer = load_clip_folder(folder, setting)
    head = detail_head(model.visual.output_dim)
    head.load_state_dict({k: v.float() for k, v in load_file(folder / DETAIL_HEAD).items()})
    return ToyEvaluator(model, tokenizer, head.requires_grad_(False), batch_size)


class AttributeAccuracy(nn.Module):
    """Per image, the share of caption attributes (shape, colour, size, texture, position,
    background) for which the true caption beats every one-attribute change, zero-shot."""

    def __init__(self, evaluator: ToyEvaluator):
        super().__init__()
        self.evaluator = evaluator
        self.features = evaluator.features  # registered, so the suite's .to(device) moves it

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.evaluator.attribute_hits(images, list(prompts)).float().mean(1)


def toy_metrics(
    evaluator: str | Path, batch_size: int = 256, kid_subsets: int = 100,
    kid_subset_size: int = 1000, sharpness_cutoff: float = 0.5,
) -> MetricSuite:
    """FID and KID on the toy CLIP's image features, CLIP score, detail score (key
    ``aesthetic``), attribute accuracy and sharpness, from the evaluator folder."""
    check_kid_settings(kid_subsets, kid_subset_size)  # settings first, then the models
    sharpness = Sharpness(sharpness_cutoff)
    toy = load_toy_evaluator(evaluator, batch_size)
    return MetricSuite(
        fid=FIDScorer(toy.features, batch_size, kid_subsets, kid_subset_size),
        scorers={"clip": toy.clip, "aesthetic": toy.detail,
                 "attribute_acc": AttributeAccuracy(toy), "sharpness": sharpness},
    )
