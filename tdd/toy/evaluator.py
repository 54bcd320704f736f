"""The toy evaluators: a small open_clip CLIP trained on shapes, and a detail head on it.

Files under ``tdd/assets/toy/evaluator/``: ``open_clip_config.json`` (open_clip's local-dir
format: ``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors`` and
``detail_head.safetensors``. Generic code loads the CLIP part with plain open_clip::

    open_clip.create_model_and_transforms(OPEN_CLIP_NAME)   # "local-dir:<evaluator folder>"
    open_clip.get_tokenizer(OPEN_CLIP_NAME)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tdd.data.shapes import ATTRIBUTES, alternatives, parse_caption
from tdd.toy.common import ASSETS

EVALUATOR_DIR = ASSETS / "evaluator"
OPEN_CLIP_NAME = f"local-dir:{EVALUATOR_DIR}"
CHECKPOINT = "open_clip_model.safetensors"
DETAIL_HEAD = "detail_head.safetensors"


def open_clip_config(embed_dim: int = 128, vision_width: int = 64, text_width: int = 64,
                     context_length: int = 24) -> dict:
    """The evaluator's architecture in open_clip's config format (ViT on 32x32, patch 4)."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "patch_size": 4, "width": vision_width,
                           "layers": 4, "head_width": 16, "mlp_ratio": 4},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408,
                         "width": text_width, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def detail_head(embed_dim: int) -> nn.Module:
    """Detail score from the unnormalized image embedding (1 = sharp render)."""
    return nn.Sequential(nn.Linear(embed_dim, 64), nn.GELU(), nn.Linear(64, 1))


def create_clip(config: dict):
    """An untrained open_clip model and its tokenizer from a config in the local-dir format."""
    import open_clip
    from open_clip.model import CLIP
    cfg = config["model_cfg"]
    model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=cfg["text_cfg"]["context_length"])
    return model, tokenizer


class ToyEvaluator:
    """CLIP features, CLIP score, zero-shot attribute accuracy, detail score; images in [0, 1]."""

    def __init__(self, model: nn.Module, tokenizer, head: nn.Module, batch: int = 500):
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head.eval()
        self.batch = batch
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.model.encode_image((c.to(self.device).float() - 0.5) / 0.5)
               for c in images.split(self.batch)]
        return torch.cat(out)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, D) image embeddings; ``normalize=False`` gives the FID features."""
        feats = self._embed_images(images)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """(N, D) normalized text embeddings (cached per caption)."""
        todo = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        for i in range(0, len(todo), self.batch):
            chunk = todo[i:i + self.batch]
            feats = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            for caption, f in zip(chunk, nn.functional.normalize(feats, dim=-1)):
                self._text_cache[caption] = f
        return torch.stack([self._text_cache[c] for c in captions])

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N,) 100 * cosine similarity of each image with its caption."""
        return 100 * (self.image_features(images) * self.text_features(captions)).sum(-1)

    @torch.no_grad()
    def attribute_hits(self, images: torch.Tensor, scenes: list) -> torch.Tensor:
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

    def attribute_accuracy(self, images: torch.Tensor, scenes: list) -> dict[str, float]:
        """Accuracy per attribute, their ``mean`` and ``all`` (every attribute right)."""
        hits = self.attribute_hits(images, scenes)
        result = {a: float(hits[:, j].float().mean()) for j, a in enumerate(ATTRIBUTES)}
        result["mean"] = float(hits.float().mean())
        result["all"] = float(hits.all(1).float().mean())
        return result

    @torch.no_grad()
    def detail_score(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) detail/sharpness score: about 1 for clean renders, lower with blur or noise."""
        return self.head(self.image_features(images, normalize=False)).squeeze(-1)


def load_toy_evaluator(path: str | Path = EVALUATOR_DIR, device: str = "cpu") -> ToyEvaluator:
    """Load the shipped evaluator (open_clip model, tokenizer, detail head)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / CHECKPOINT).is_file():
        raise FileNotFoundError(f"toy evaluator missing: {root / CHECKPOINT} "
                                "(build it with `python -m tdd.toy.build evaluator`)")
    config = json.loads((root / "open_clip_config.json").read_text())
    model, tokenizer = create_clip(config)
    state = {k: v.float() for k, v in load_file(root / CHECKPOINT).items()}
    model.load_state_dict(state)
    head = detail_head(config["model_cfg"]["embed_dim"])
    head.load_state_dict({k: v.float() for k, v in load_file(root / DETAIL_HEAD).items()})
    return ToyEvaluator(model.to(device), tokenizer, head.to(device))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)
