"""The discriminator of the adversarial term (docs/methods.md section 1.2): the frozen teacher
UNet as feature extractor, small trainable heads on its down-block and mid-block outputs."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.func import functional_call

from tdd.models.conditioning import Conditioning


def _cast(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def check_unet(unet: nn.Module) -> UNet2DConditionModel:
    """The teacher must be a diffusers UNet: the features are its down and mid blocks."""
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"adversarial=hinge reads the down and mid blocks of a "
                         f"UNet2DConditionModel teacher; {type(unet).__name__} has none")
    return unet


def feature_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of each feature map :func:`unet_features` returns."""
    channels = list(unet.config.block_out_channels)
    return channels + ([channels[-1]] if unet.mid_block is not None else [])


@contextmanager
def without_checkpointing(unet: UNet2DConditionModel):
    """Gradient checkpointing off for a forward whose backward runs later under another adapter
    state (a LoRA student's UNet recomputed with its adapters on would give wrong gradients)."""
    active = unet.is_gradient_checkpointing
    if active:
        unet.disable_gradient_checkpointing()
    try:
        yield unet
    finally:
        if active:
            unet.enable_gradient_checkpointing()


def unet_features(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor,
                  conditioning: Conditioning) -> list[torch.Tensor]:
    """The outputs of every down block and of the mid block of ``unet`` at ``(x, t)``, as its
    own forward computes them (time, added and text conditioning); the up blocks are skipped."""
    kwargs = _cast(conditioning.unet_kwargs(), unet.dtype)
    text, added = kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs")
    x = x.to(unet.dtype)
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
    emb = emb if aug is None else emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=text,
                                              added_cond_kwargs=added)
    sample, features = unet.conv_in(x), []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=text)
        else:
            sample, _ = block(hidden_states=sample, temb=emb)
        features.append(sample)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=text)
        else:
            sample = unet.mid_block(sample, emb)
        features.append(sample)
    return features


class DiscriminatorHead(nn.Module):
    """conv -> GroupNorm -> LeakyReLU, twice with a residual around the second, then a conv to
    one channel: a logit per feature-map position."""

    def __init__(self, channels: int, kernel_size: int = 1, norm_groups: int = 32):
        super().__init__()
        groups = math.gcd(norm_groups, channels)

        def block():
            return nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2),
                nn.GroupNorm(groups, channels), nn.LeakyReLU())

        self.block1, self.block2 = block(), block()
        self.out = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        hidden = self.block1(feature)
        return self.out(self.block2(hidden) + hidden)


class Discriminator(nn.Module):
    """One trainable head per feature map of the teacher UNet. The UNet is not a submodule: it
    is passed at call time (for a LoRA student, the student's own UNet with adapters off)."""

    def __init__(self, unet: nn.Module, kernel_size: int = 1, norm_groups: int = 32):
        super().__init__()
        channels = feature_channels(check_unet(unet))
        self.heads = nn.ModuleList(
            DiscriminatorHead(c, kernel_size, norm_groups) for c in channels)

    def features(self, unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor,
                 conditioning: Conditioning) -> list[torch.Tensor]:
        """The UNet's feature maps for latents ``x`` at noisy timesteps ``t``."""
        with without_checkpointing(unet):
            return unet_features(unet, x, t, conditioning)

    def logits(self, features: list[torch.Tensor], frozen_heads: bool = False
               ) -> list[torch.Tensor]:
        """A logit map per head (in the heads' dtype, fp32).

        ``frozen_heads``: the heads run on detached copies of their weights, so a generator
        loss sends gradient to the features (and through them to the student) but none to the
        heads.
        """
        logits = []
        for head, feature in zip(self.heads, features):
            feature = feature.to(head.out.weight.dtype)
            if frozen_heads:
                weights = {name: p.detach() for name, p in head.named_parameters()}
                logits.append(functional_call(head, weights, (feature,)))
            else:
                logits.append(head(feature))
        return logits
