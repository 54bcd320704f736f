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
from tdd.metrics.kid import check_kid_settings
from tdd.metrics.sharpness import Sharpness

#: What a per-image score that compares with real images holds when there are none.
NO_REAL_IMAGES = "not computed: no real images"


def fid_key(reference: str) -> str:
    """Result key of FID against a reference: ``fid`` for real images, ``fid_<name>`` otherwise."""
    return "fid" if reference == "real" else f"fid_{reference}"


def kid_key(reference: str) -> str:
    """Result key of KID against a reference: ``kid`` for real images, ``kid_<name>``."""
    return "kid" if reference == "real" else f"kid_{reference}"


class MetricSuite:
    """FID and KID against every reference that was set, and the mean of each per-image scorer.

    ``scorers`` maps a result key ("clip", "aesthetic", "attribute_acc", ...) to a module called as
    ``scorer(images, prompts) -> (N,)``. Images are (N, 3, H, W) floats in [0, 1]. A scorer with
    ``needs_reference`` (sharpness) also receives the real images (``set_reference("real")``)
    and is reported as not computed without them. The per-image values since ``reset`` are kept
    (``per_image``). Not an ``nn.Module`` on purpose: it never ends up inside a LightningModule
    checkpoint.
    """

    enabled = True

    def __init__(
        self, fid: FIDScorer | None = None, scorers: Mapping[str, nn.Module] | None = None
    ):
        self.fid = fid
        self.scorers = dict(scorers or {})
        self.means = {name: MeanMetric(nan_strategy="error") for name in self.scorers}
        self.values: dict[str, list[Tensor]] = {name: [] for name in self.scorers}

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
        if name == "real":
            self.set_scorer_reference(images)

    def add_reference(self, name: str, images: Tensor) -> None:
        """Stream a large reference set in batches (after ``set_reference`` or from empty)."""
        self._require_fid().add_reference(images, name)

    def set_scorer_reference(self, images: Tensor) -> None:
        """Real images for the scorers that compare with them (sharpness)."""
        for scorer in self.scorers.values():
            if getattr(scorer, "needs_reference", False):
                scorer.set_reference(images)

    def _ready(self, name: str) -> bool:
        scorer = self.scorers[name]
        return not getattr(scorer, "needs_reference", False) or scorer.has_reference

    def reset(self) -> None:
        """Start a new evaluated setting; reference statistics stay."""
        if self.fid is not None:
            self.fid.reset()
        for mean in self.means.values():
            mean.reset()
        self.values = {name: [] for name in self.scorers}

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        """Add one batch of generated images and the prompts they were made from."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"MetricSuite: {images.shape[0]} images but {len(prompts)} prompts")
        if self.fid is not None:
            self.fid.update(images)
        for name, scorer in self.scorers.items():
            if self._ready(name):
                values = scorer(images, prompts)
                self.means[name].update(values)
                self.values[name].append(values.detach().float().cpu())

    def compute(
        self, references: Sequence[str] | None = None, bootstrap_draws: int = 0,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Results since ``reset``: ``fid``/``fid_<ref>`` and ``kid``/``kid_<ref>`` per
        reference, one key per scorer, and with ``bootstrap_draws`` > 0 the intervals
        ``fid_ci``, ``kid_ci``, ... (``[low, high]``, :mod:`tdd.metrics.bootstrap`).
        ``generator`` draws the KID subsets and the resampled images."""
        out: dict = {}
        if self.fid is not None:
            names = self.fid.reference_names if references is None else references
            fids = self.fid.compute(names)
            out.update({fid_key(k): v for k, v in fids.items()})
            kids = self.fid.kid(names, generator) if names else {}
            out.update({kid_key(k): v for k, v in kids.items()})
            if bootstrap_draws and names:
                estimates = {k: {"fid": fids[k], "kid": kids[k]} for k in names}
                for k, cis in self.fid.intervals(names, estimates, bootstrap_draws,
                                                 generator).items():
                    out[f"{fid_key(k)}_ci"] = cis["fid"]
                    if "kid" in cis:
                        out[f"{kid_key(k)}_ci"] = cis["kid"]
        for name, mean in self.means.items():
            if not self._ready(name):
                out[name] = NO_REAL_IMAGES
            elif mean.weight.sum() == 0:
                raise ValueError(f"MetricSuite: no images scored for {name!r}")
            else:
                out[name] = float(mean.compute())
        return out

    def per_image(self) -> dict[str, Tensor]:
        """(N,) values of every per-image score since ``reset``, in image order."""
        return {name: torch.cat(chunks) for name, chunks in self.values.items() if chunks}

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

    def compute(self, references: Sequence[str] | None = None, bootstrap_draws: int = 0,
                generator: torch.Generator | None = None) -> dict[str, float]:
        return {}

    def per_image(self) -> dict[str, Tensor]:
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
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    sharpness_cutoff: float = 0.5,
) -> MetricSuite:
    """``metrics=real``: InceptionV3 FID and KID, open_clip CLIP score, LAION aesthetic and
    sharpness (:mod:`tdd.metrics.sharpness`), the models from local files.

    Every path and architecture name is checked before any model is built; an error names the
    ``metrics.*`` setting. The aesthetic CLIP defaults to the CLIP-score model (loaded once).
    """
    aesthetic_clip_model = aesthetic_clip_model or clip_model
    aesthetic_clip_checkpoint = aesthetic_clip_checkpoint or clip_checkpoint
    check_kid_settings(kid_subsets, kid_subset_size)
    sharpness = Sharpness(sharpness_cutoff)
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
        fid=FIDScorer.inception(fid_weights, antialias=False, batch_size=batch_size,
                                kid_subsets=kid_subsets, kid_subset_size=kid_subset_size),
        scorers={
            "clip": CLIPScorer(clip, tokenizer, batch_size),
            "aesthetic": AestheticScorer(CLIPImageFeatures(aesthetic_clip), head, batch_size),
            "sharpness": sharpness,
        },
    )
