"""The toy evaluator's CLIP for the builders: its architecture, an untrained instance, and its
text tower as the ``CLIPTextModel`` the toy teacher starts from.

The runtime side (loading the shipped evaluator, scoring) is :mod:`tdd.metrics.toy`.
"""

from __future__ import annotations

import open_clip
from open_clip.model import CLIP
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel


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


def create_clip(config: dict):
    """An untrained open_clip model and its tokenizer from a config in the local-dir format,
    with the config's preprocessing attached (what ``CLIPImageFeatures`` reads)."""
    cfg = config["model_cfg"]
    model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    open_clip.set_model_preprocess_cfg(model, config["preprocess_cfg"])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=cfg["text_cfg"]["context_length"])
    return model, tokenizer


def clip_text_model(model: nn.Module, context_length: int | None = None):
    """The text tower of an open_clip ``CLIP`` as a transformers ``CLIPTextModel``.

    Same weights, same per-token outputs (after the final LayerNorm). The toy teacher starts
    from it, as Stable Diffusion starts from a contrastively trained CLIP text encoder.
    """
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
