"""Tiny SD3- and FLUX-shaped pipelines saved as local diffusers folders (flow teachers)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from tdd.models.tiny import tiny_vae
from tdd.models.tokenizer import clip_tokenizer

MAX_LENGTH = 16  # CLIP tokens; the T5 length is the teacher's max_sequence_length
T5_DIM = 32


def _clip(hidden: int, projection: bool):
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5():
    return T5EncoderModel(T5Config(vocab_size=49408, d_model=T5_DIM, d_kv=8, d_ff=48,
                                   num_layers=1, num_heads=2, pad_token_id=49407))


def _vae():
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)  # SD3 / FLUX VAEs shift the latents
    return vae


def save_tiny_sd3(directory: str | Path, seed: int = 0, t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline folder: CLIP-L and CLIP-G (8 wide each), an optional T5,
    a one-layer SD3 transformer on 4-channel 8x8 latents (32x32 images), shift 3."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
    )
    tokenizer = clip_tokenizer(MAX_LENGTH)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(8, True), tokenizer=tokenizer,
        text_encoder_2=_clip(8, True), tokenizer_2=tokenizer,
        text_encoder_3=_t5() if t5 else None, tokenizer_3=tokenizer if t5 else None,
    )
    pipe.save_pretrained(directory)
    return Path(directory)


def save_tiny_flux(directory: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder: CLIP (pooled, 16 wide) and T5, a FLUX transformer with one double
    and one single block on packed 4-channel 8x8 latents, dynamic (resolution) shifting; with
    ``guidance_embeds`` shaped like FLUX.1-dev, without like FLUX.1-schnell."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    tokenizer = clip_tokenizer(MAX_LENGTH)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        transformer=transformer, vae=_vae(), scheduler=scheduler,
        text_encoder=_clip(16, False), tokenizer=tokenizer,
        text_encoder_2=_t5(), tokenizer_2=tokenizer,
    )
    pipe.save_pretrained(directory)
    return Path(directory)
