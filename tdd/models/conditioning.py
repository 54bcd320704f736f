"""Text conditioning for SD-style (one encoder) and SDXL-style (two encoders) UNets."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Conditioning:
    """What a UNet2DConditionModel is conditioned on besides the timestep."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.hidden}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        added = {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.hidden, other.hidden]), added)

    def zeros_like(self) -> Conditioning:
        """All-zero text embeddings (the SDXL scripts' uncond); size conditioning is kept."""
        added = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in self.added.items()}
        return Conditioning(torch.zeros_like(self.hidden), added)

    def with_sizes_of(self, other: Conditioning) -> Conditioning:
        """This text conditioning with ``other``'s size conditioning (SDXL ``time_ids``)."""
        if "time_ids" not in self.added:
            return self
        return Conditioning(self.hidden, {**self.added, "time_ids": other.added["time_ids"]})

    def __len__(self) -> int:
        return self.hidden.shape[0]


class TextConditioner(nn.Module):
    """Tokenizer(s) + frozen text encoder(s) -> :class:`Conditioning`.

    One encoder: SD1.5 / SD2 / toy (last hidden state). Two encoders: SDXL (penultimate hidden
    states concatenated; pooled projection of the second plus ``time_ids`` as added conditions).
    """

    def __init__(self, tokenizers: list, encoders: list[nn.Module], resolution: int):
        super().__init__()
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ValueError("TextConditioner takes one or two (tokenizer, encoder) pairs")
        self.tokenizers = tokenizers
        self.encoders = nn.ModuleList(encoders)
        self.resolution = resolution
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def _tokens(self, tokenizer, captions: list[str]) -> torch.Tensor:
        ids = tokenizer(
            list(captions), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    def time_ids(self, batch_size: int, original_size=None, crop_top_left=None) -> torch.Tensor:
        """SDXL micro-conditioning per sample: (original h, w, crop top, left, target h, w).

        Without size information (sampling, sources that do not crop): the square resolution,
        uncropped, as the SDXL pipelines use at inference.
        """
        size = self.resolution
        default = torch.tensor([[size, size]]).expand(batch_size, 2)
        original = default if original_size is None else torch.as_tensor(original_size)
        crop = (torch.zeros_like(default) if crop_top_left is None
                else torch.as_tensor(crop_top_left))
        return torch.cat([original.reshape(-1, 2), crop.reshape(-1, 2), default], dim=1)

    @torch.no_grad()
    def forward(self, captions: list[str], original_size=None, crop_top_left=None
                ) -> Conditioning:
        """Encode ``captions``; for SDXL, each sample's ``original_size`` and
        ``crop_top_left`` (B x 2, as the data sources return them) become its ``time_ids``."""
        if len(self.encoders) == 1:
            ids = self._tokens(self.tokenizers[0], captions)
            return Conditioning(self.encoders[0](ids)[0])
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._tokens(tokenizer, captions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection encoder (the last one)
        time_ids = self.time_ids(len(captions), original_size, crop_top_left)
        time_ids = time_ids.to(pooled.device, pooled.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return Conditioning(torch.cat(hidden, dim=-1), added)
