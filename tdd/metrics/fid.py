"""Frechet distance between Gaussian fits of image features (Heusel et al. 2017, "FID")."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from tdd.metrics.bootstrap import fid_interval, kid_interval, resample_counts
from tdd.metrics.files import require_file
from tdd.metrics.kid import check_kid_settings, kid

Images = Tensor | Iterable[Tensor]

#: What a KID cell holds when the reference came as cached statistics (no features).
NO_FEATURES = "not computed: the reference is cached statistics, without features"


def iter_batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Chunks of at most ``batch_size`` from one (N, 3, H, W) tensor or an iterable of them."""
    for block in [images] if isinstance(images, Tensor) else images:
        yield from block.split(batch_size)


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID InceptionV3 (torch-fidelity port), from a local file.

    Images in [0, 1] are quantised to uint8 the way saved PNGs are (round, not truncate). With
    ``antialias=False`` the resize to 299x299 is TF1's bilinear, as in the published FID numbers.
    """

    def __init__(
        self,
        weights_path: str | Path,
        antialias: bool = False,
        setting: str = "metrics.fid_weights",
    ):
        super().__init__()
        path = require_file(weights_path, setting)
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(path),
            antialias=antialias,
        )

    def forward(self, images: Tensor) -> Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(pixels)


class _Precomputed(nn.Module):
    """Identity "extractor": FIDScorer extracts features once and feeds every reference metric."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FIDScorer(nn.Module):
    """FID of generated images against named reference sets ("real", "teacher", ...).

    Reference statistics are accumulated once (``set_reference``/``add_reference``) and kept;
    ``reset`` clears only the generated side, so every sampler setting is scored against the same
    reference features. Generated features are extracted once and shared by all references. The
    statistics and the distance are torchmetrics' (float64, DDP-synchronised on ``compute``).

    The features themselves are kept as well (float32, on the scorer's device) for KID
    (:mod:`tdd.metrics.kid`, ``kid_subsets`` subsets of ``kid_subset_size``) and the bootstrap
    intervals (:mod:`tdd.metrics.bootstrap`); a reference given as cached statistics has none.
    """

    def __init__(
        self, feature: nn.Module, batch_size: int = 64, kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ):
        super().__init__()
        self.feature = feature.eval()
        self.batch_size = batch_size
        check_kid_settings(kid_subsets, kid_subset_size)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.references = nn.ModuleDict()
        self._reference_features: dict[str, list[Tensor]] = {}
        self._generated: list[Tensor] = []

    @classmethod
    def inception(
        cls,
        weights_path: str | Path,
        antialias: bool = False,
        batch_size: int = 64,
        setting: str = "metrics.fid_weights",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> FIDScorer:
        """The literature's FID: InceptionV3 weights from a local file, TF1 resize by default."""
        return cls(InceptionFeatures(weights_path, antialias, setting), batch_size, kid_subsets,
                   kid_subset_size)

    @property
    def reference_names(self) -> list[str]:
        return list(self.references.keys())

    @torch.no_grad()
    def features(self, images: Images) -> Tensor:
        """(N, D) features of images in [0, 1], computed in chunks of ``batch_size``."""
        device = module_device(self.feature)
        chunks = [self.feature(b.to(device)) for b in iter_batches(images, self.batch_size)]
        if not chunks:
            raise ValueError("FIDScorer: no images given")
        return torch.cat([c.reshape(c.shape[0], -1) for c in chunks])

    def add_reference(self, images: Images, name: str = "real") -> None:
        """Accumulate more images into reference ``name`` (created on first use)."""
        feats = self.features(images)
        if name not in self.references:
            metric = FrechetInceptionDistance(
                feature=_Precomputed(feats.shape[1]), reset_real_features=False
            )
            self.references[name] = metric.to(feats.device)
        self.references[name].update(feats, real=True)
        self._reference_features.setdefault(name, []).append(feats.float())

    def set_reference_statistics(
        self, mean: Tensor, cov: Tensor, num_samples: int, name: str = "real"
    ) -> None:
        """Replace reference ``name`` by known statistics (e.g. cached on disk)."""
        self.clear_reference(name)
        device = module_device(self.feature)
        metric = FrechetInceptionDistance(
            feature=_Precomputed(mean.shape[0]), reset_real_features=False
        ).to(device)
        mean = mean.detach().to(device, torch.float64)
        cov = cov.detach().to(device, torch.float64)
        metric.real_features_sum = mean * num_samples
        metric.real_features_cov_sum = cov * (num_samples - 1) + num_samples * torch.outer(
            mean, mean)
        metric.real_features_num_samples = torch.tensor(num_samples, device=device)
        self.references[name] = metric

    def set_reference(self, images: Images, name: str = "real") -> None:
        """Replace reference ``name`` by the statistics of ``images``."""
        self.clear_reference(name)
        self.add_reference(images, name)

    def clear_reference(self, name: str) -> None:
        if name in self.references:
            del self.references[name]
        self._reference_features.pop(name, None)

    def reset(self) -> None:
        """Forget generated images; reference statistics stay."""
        for metric in self.references.values():
            metric.reset()
        self._generated = []

    def update(self, images: Images) -> None:
        """Add generated images, compared later against every reference."""
        if not self.references:
            raise RuntimeError("FIDScorer: no reference set; call set_reference(images, name)")
        feats = self.features(images)
        for metric in self.references.values():
            metric.update(feats, real=False)
        self._generated.append(feats.float())

    def compute(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """FID per reference name for the generated images added since ``reset``."""
        out = {}
        for name in self.reference_names if names is None else names:
            if name not in self.references:
                raise KeyError(f"FIDScorer: no reference {name!r}; have {self.reference_names}")
            metric = self.references[name]
            counts = (int(metric.real_features_num_samples), int(metric.fake_features_num_samples))
            if min(counts) < 2:
                raise ValueError(
                    f"FIDScorer: FID vs {name!r} needs >= 2 reference and >= 2 generated images, "
                    f"have {counts[0]} and {counts[1]}"
                )
            out[name] = float(metric.compute())
        return out

    def kid(self, names: Sequence[str], generator: torch.Generator | None = None) -> dict:
        """KID per reference name (a reason string where the reference has no features)."""
        generated = torch.cat(self._generated)
        return {name: kid(generated, features, self.kid_subsets, self.kid_subset_size,
                          generator) if (features := self._features(name)) is not None
                else NO_FEATURES for name in names}

    def intervals(
        self, names: Sequence[str], estimates: dict[str, dict[str, float]], draws: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, dict[str, list[float]]]:
        """Bootstrap intervals over the generated images: ``{name: {"fid": [low, high],
        "kid": [low, high]}}`` around ``estimates[name]`` (one resampling for every score).
        KID's needs all generated images in one subset (at most ``kid_subset_size``)."""
        generated = torch.cat(self._generated)
        counts = resample_counts(len(generated), draws, generator)
        out = {}
        for name in names:
            metric = self.references[name]
            n = metric.real_features_num_samples
            mean = metric.real_features_sum.double() / n
            cov = (metric.real_features_cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1)
            out[name] = {"fid": fid_interval(generated, mean, cov, estimates[name]["fid"],
                                             counts)}
            features = self._features(name)  # KID: the kernel matrix of all generated images
            if (features is not None and isinstance(estimates[name].get("kid"), float)
                    and len(generated) <= self.kid_subset_size):
                out[name]["kid"] = kid_interval(generated, features, estimates[name]["kid"],
                                                counts)
        return out

    def _features(self, name: str) -> Tensor | None:
        chunks = self._reference_features.get(name)
        return None if not chunks else torch.cat(chunks)

    def score(self, images: Images, reference: str = "real") -> float:
        """FID of ``images`` against one reference (clears earlier generated images)."""
        self.reset()
        self.update(images)
        return self.compute([reference])[reference]
