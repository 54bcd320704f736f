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


def open_clip_config(embed_dim: int = 128, vision_width: int = 16, text_width: int = 48,
                     context_length: int = 32) -> dict:
    """The evaluator's architecture in open_clip's config format.

    Vision: open_clip's ModifiedResNet on renders upsampled 2x to 64x64 (its stem halves the
    side twice before the first stage; at 32x32 small shapes lose their corners there).
    Text: a 3-layer CLIP text transformer whose context matches the toy teacher's tokenizer, so
    the teacher can start from it (see ``tdd.toy.build_teacher``).
    """
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": vision_width,
                           "head_width": 32},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408,
                         "width": text_width, "heads": 4, "layers": 3},
        },
        "preprocess_cfg": {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bilinear", "resize_mode": "shortest"},
    }


def vision_size(model: nn.Module) -> int:
    """Input side of an open_clip model's vision tower (an int or an (h, w) pair there)."""
    size = model.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Renders in [0, 1] -> the vision tower's input: resized to ``size``, mapped to [-1, 1]."""
    if images.shape[-1] != size:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                           align_corners=False)
    return (images - 0.5) / 0.5


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
        self.batch, self.size = batch, vision_size(model)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.model.encode_image(model_input(c.to(self.device).float(), self.size))
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


def clip_text_model(model: nn.Module, context_length: int | None = None):
    """The text tower of an open_clip ``CLIP`` as a transformers ``CLIPTextModel``.

    Same weights, same per-token outputs (after the final LayerNorm). The toy teacher starts
    from it, as Stable Diffusion starts from a contrastively trained CLIP text encoder.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    width = model.token_embedding.embedding_dim
    blocks = model.transformer.resblocks
    config = CLIPTextConfig(
        vocab_size=model.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=context_length or model.positional_embedding.shape[0],
        projection_dim=width, hidden_act="gelu", layer_norm_eps=blocks[0].ln_1.eps,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    encoder = CLIPTextModel(config)
    state = {
        "embeddings.token_embedding.weight": model.token_embedding.weight,
        "embeddings.position_embedding.weight":
            model.positional_embedding[:config.max_position_embeddings],
        "final_layer_norm.weight": model.ln_final.weight,
        "final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = getattr(block.attn, f"in_proj_{kind}").chunk(3)
            state.update({
                f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                f"{prefix}self_attn.v_proj.{kind}": v,
                f"{prefix}self_attn.out_proj.{kind}": getattr(block.attn.out_proj, kind),
                f"{prefix}layer_norm1.{kind}": getattr(block.ln_1, kind),
                f"{prefix}layer_norm2.{kind}": getattr(block.ln_2, kind),
                f"{prefix}mlp.fc1.{kind}": getattr(block.mlp.c_fc, kind),
                f"{prefix}mlp.fc2.{kind}": getattr(block.mlp.c_proj, kind),
            })
    encoder.load_state_dict({k: v.detach().clone().float() for k, v in state.items()})
    return encoder.eval()


def open_clip_token_states(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token outputs of an open_clip ``CLIP`` text tower (final LayerNorm, no pooling)."""
    x = model.token_embedding(ids) + model.positional_embedding[:ids.shape[1]]
    mask = model.attn_mask[:ids.shape[1], :ids.shape[1]]
    return model.ln_final(model.transformer(x, attn_mask=mask))
