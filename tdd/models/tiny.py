"""Tiny random SD- and SDXL-shaped teachers built in code, for tests and debugging."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from tdd.models.conditioning import TextConditioner
from tdd.models.teacher import Teacher
from tdd.models.tokenizer import clip_tokenizer
from tdd.schedule import SD_SCHEDULER


def _text_encoder(hidden: int, projection: bool, max_length: int):
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_unet(cross_attention_dim: int, sample_size: int, sdxl: bool = False):
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + cross_attention_dim // 2)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, **extra,
    )


def tiny_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.5,
    )


def build_tiny(
    resolution: int = 32, sdxl: bool = False, seed: int = 0, max_length: int = 16
) -> Teacher:
    """Random tiny components with Stable Diffusion's shapes (VAE downsamples by 4)."""
    torch.manual_seed(seed)
    hidden = 16
    tokenizer = clip_tokenizer(max_length)
    encoders = [_text_encoder(hidden, False, max_length)]
    tokenizers = [tokenizer]
    if sdxl:
        encoders.append(_text_encoder(hidden, True, max_length))
        tokenizers.append(tokenizer)
    cross_dim = hidden * len(encoders)
    teacher = Teacher(
        unet=tiny_unet(cross_dim, resolution // 4, sdxl), vae=tiny_vae(),
        text=TextConditioner(tokenizers, encoders, resolution),
        scheduler_config=dict(SD_SCHEDULER), resolution=resolution,
    )
    for module in teacher.frozen_modules():
        module.requires_grad_(False).eval()
    return teacher

