"""The metric suite an evaluation loop calls: FID vs named references plus per-image scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from tdd.metrics.aesthetic import AestheticPredictor, AestheticScorer
from tdd.metrics.clip_model import CLIPImageFeatures, clip_config_name, load_clip
from tdd.metrics.clip_score import CLIPScorer
from tdd.metrics.fid import FIDScorer
from tdd.metrics.files import require_file


def fid_key(reference: str) -> str:
    """Result key of FID against a reference: ``fid`` for real images, ``fid_<name>`` otherwise."""
    return "fid" if reference == "real" else f"fid_{reference}"


class MetricSuite:
    """FID against every reference that was set, and the mean of each per-image scorer.

    ``scorers`` maps a result key ("clip", "aesthetic", "attribute_acc", ...) to a module called as
    ``scorer(images, prompts) -> (N,)``. Images are (N, 3, H, W) floats in [0, 1]. Not an
    ``nn.Module`` on purpose: it never ends up inside a LightningModule checkpoint.
    """

    enabled = True

    def __init__(
        self, fid: FIDScorer | None = None, scorers: Mapping[str, nn.Module] | None = None
    ):
        self.fid = fid
        self.scorers = dict(scorers or {})
        self.means = {name: MeanMetric(nan_strategy="error") for name in self.scorers}

    def to(self, device: torch.device | str) -> MetricSuite:
        for module in (self.fid, *self.scorers.values(), *self.means.values()):
            if module is not None:
                module.to(device)
        return self

    def _require_fid(self) -> FIDScorer:
        if self.fid is None:
            raise RuntimeError("MetricSuite: this suite has no FID scorer")
        return self.fid

    def set_reference(self, name: str, images: Tensor) -> None:
        """FID reference: ``"real"`` (renders, photos) or ``"teacher"`` (same prompts, seeds)."""
        self._require_fid().set_reference(images, name)

    def add_reference(self, name: str, images: Tensor) -> None:
        """Stream a large reference set in batches (after ``set_reference`` or from empty)."""
        self._require_fid().add_reference(images, name)

    def reset(self) -> None:
        """Start a new evaluated setting; reference statistics stay."""
        if self.fid is not None:
            self.fid.reset()
        for mean in self.means.values():
            mean.reset()

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        """Add one batch of generated images and the prompts they were made from."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"MetricSuite: {images.shape[0]} images but {len(prompts)} prompts")
        if self.fid is not None:
            self.fid.update(images)
        for name, scorer in self.scorers.items():
            self.means[name].update(scorer(images, prompts))

    def compute(self, references: Sequence[str] | None = None) -> dict[str, float]:
        """Results since ``reset``: ``fid``/``fid_<ref>`` per reference and one key per scorer."""
        out = {}
        if self.fid is not None:
            names = self.fid.reference_names if references is None else references
            out.update({fid_key(k): v for k, v in self.fid.compute(names).items()})
        for name, mean in self.means.items():
            if mean.weight.sum() == 0:
                raise ValueError(f"MetricSuite: no images scored for {name!r}")
            out[name] = float(mean.compute())
        return out

    def score(
        self, images: Tensor, prompts: Sequence[str], references: Sequence[str] | None = None
    ) -> dict[str, float]:
        """``reset`` + ``update`` + ``compute`` for one in-memory set of generated images."""
        self.reset()
        self.update(images, prompts)
        return self.compute(references)


class NoMetrics:
    """``metrics=none``: pure training runs. ``enabled`` is False; nothing is scored."""

    enabled = False
    fid = None
    scorers: dict[str, nn.Module] = {}

    def to(self, device: torch.device | str) -> NoMetrics:
        return self

    def set_reference(self, name: str, images: Tensor) -> None:
        pass

    def add_reference(self, name: str, images: Tensor) -> None:
        pass

    def reset(self) -> None:
        pass

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        pass

    def compute(self, references: Sequence[str] | None = None) -> dict[str, float]:
        return {}

    def score(
        self, images: Tensor, prompts: Sequence[str], references: Sequence[str] | None = None
    ) -> dict[str, float]:
        return {}


def real_metrics(
    fid_weights: str | Path,
    clip_checkpoint: str | Path,
    aesthetic_head: str | Path,
    clip_model: str = "ViT-L-14",
    aesthetic_clip_model: str | None = None,
    aesthetic_clip_checkpoint: str | Path | None = None,
    batch_size: int = 32,
) -> MetricSuite:
    """``metrics=real``: InceptionV3 FID, open_clip CLIP score, LAION aesthetic, all local files.

    Every path and architecture name is checked before any model is built; an error names the
    ``metrics.*`` setting. The aesthetic CLIP defaults to the CLIP-score model (loaded once).
    """
    aesthetic_clip_model = aesthetic_clip_model or clip_model
    aesthetic_clip_checkpoint = aesthetic_clip_checkpoint or clip_checkpoint
    require_file(fid_weights, "metrics.fid_weights")
    require_file(clip_checkpoint, "metrics.clip_checkpoint")
    require_file(aesthetic_head, "metrics.aesthetic_head")
    require_file(aesthetic_clip_checkpoint, "metrics.aesthetic_clip_checkpoint")
    clip_config_name(clip_model, "metrics.clip_model")
    clip_config_name(aesthetic_clip_model, "metrics.aesthetic_clip_model")

    clip, tokenizer = load_clip(clip_model, clip_checkpoint)
    same_file = str(aesthetic_clip_checkpoint) == str(clip_checkpoint)
    if same_file and aesthetic_clip_model == clip_model:
        aesthetic_clip = clip
    else:
        aesthetic_clip, _ = load_clip(
            aesthetic_clip_model, aesthetic_clip_checkpoint,
            "metrics.aesthetic_clip_model", "metrics.aesthetic_clip_checkpoint",
        )
    head = AestheticPredictor.load(aesthetic_head)
    return MetricSuite(
        fid=FIDScorer.inception(fid_weights, antialias=False, batch_size=batch_size),
        scorers={
            "clip": CLIPScorer(clip, tokenizer, batch_size),
            "aesthetic": AestheticScorer(CLIPImageFeatures(aesthetic_clip), head, batch_size),
        },
    )
