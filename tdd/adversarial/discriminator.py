"""The discriminator of the adversarial term (docs/methods.md section 1.2): the frozen teacher
network as feature extractor, small trainable heads on its features: a UNet's down-block and
mid-block outputs, or a flow transformer's image tokens after blocks of its first half."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.func import functional_call

from tdd.models.conditioning import Conditioning
from tdd.models.flow import is_transformer, run_transformer

#: At most this many feature maps are taken from a flow transformer's first half of blocks.
MAX_TRANSFORMER_FEATURES = 4


def _cast(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def check_unet(unet: nn.Module) -> nn.Module:
    """The teacher must be a diffusers UNet (features: its down and mid blocks) or a flow
    transformer, SD3 or FLUX (features: its image tokens after joint blocks)."""
    if not (isinstance(unet, UNet2DConditionModel) or is_transformer(unet)):
        raise ValueError(f"adversarial=hinge reads the down and mid blocks of a "
                         f"UNet2DConditionModel teacher or the joint blocks of an SD3/FLUX "
                         f"transformer; {type(unet).__name__} has neither")
    return unet


def feature_blocks(transformer: nn.Module) -> list[int]:
    """Indices of the joint (two-stream) blocks whose image tokens are features: up to
    :data:`MAX_TRANSFORMER_FEATURES` evenly spaced over the first half of the blocks, the
    counterpart of a UNet's down and mid blocks; the later blocks are not run."""
    half = max(1, len(transformer.transformer_blocks) // 2)
    count = min(MAX_TRANSFORMER_FEATURES, half)
    return [round((i + 1) * half / count) - 1 for i in range(count)]


def feature_channels(unet: nn.Module) -> list[int]:
    """Channels of each feature map :func:`unet_features` or :func:`transformer_features`
    returns."""
    if is_transformer(unet):
        return [unet.inner_dim] * len(feature_blocks(unet))
    channels = list(unet.config.block_out_channels)
    return channels + ([channels[-1]] if unet.mid_block is not None else [])


@contextmanager
def without_checkpointing(unet: nn.Module):
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


class _FeaturesTaken(Exception):
    """Ends a transformer's forward once its last feature block has run."""


def transformer_features(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor,
                         conditioning: Conditioning) -> list[torch.Tensor]:
    """The image-stream tokens after each of :func:`feature_blocks` of an SD3 or FLUX
    transformer at ``(x, t)`` (``t`` the model timestep), in the stock pipeline's call; the
    tokens (B, L, C) are laid back on their patch grid as (B, C, h/p, w/p) maps. The blocks
    after the last feature block are not run."""
    blocks, caught = feature_blocks(transformer), []

    def keep(module, args, output):
        caught.append(output[1])  # joint blocks return (text tokens, image tokens)
        if len(caught) == len(blocks):
            raise _FeaturesTaken

    handles = [transformer.transformer_blocks[i].register_forward_hook(keep) for i in blocks]
    try:
        run_transformer(transformer, x, t, conditioning)
    except _FeaturesTaken:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [token_maps(tokens, *x.shape[-2:]) for tokens in caught]


def token_maps(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image tokens (B, L, C) of ``height`` x ``width`` latents back on their patch grid,
    (B, C, height / p, width / p): SD3's patch embedding and FLUX's 2x2 packing both order the
    patches row by row."""
    patch = round(math.sqrt(height * width / tokens.shape[1]))
    return tokens.transpose(1, 2).reshape(len(tokens), -1, height // patch, width // patch)


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
    """One trainable head per feature map of the teacher network (UNet or flow transformer).
    The network is not a submodule: it is passed at call time (for a LoRA student, the
    student's own network with adapters off)."""

    def __init__(self, unet: nn.Module, kernel_size: int = 1, norm_groups: int = 32):
        super().__init__()
        channels = feature_channels(check_unet(unet))
        self.heads = nn.ModuleList(
            DiscriminatorHead(c, kernel_size, norm_groups) for c in channels)

    def features(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 conditioning: Conditioning) -> list[torch.Tensor]:
        """The network's feature maps for latents ``x`` at the model timesteps ``t`` of the
        noisy timesteps."""
        extract = transformer_features if is_transformer(unet) else unet_features
        with without_checkpointing(unet):
            return extract(unet, x, t, conditioning)

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
