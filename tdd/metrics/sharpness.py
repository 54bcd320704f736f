"""Sharpness: the high-frequency share of an image's spectral energy, relative to real images.

Blur removes fine detail (the toy world's stripes and dots) first: it lowers the share of the
luma energy at high spatial frequencies. Per image, that share is measured on the mirrored image
(the image and its reflections, so the borders add no false edges: the DCT's view), above
``cutoff`` times the Nyquist frequency, and divided by the mean share of the real reference
images. About 1: as sharp as the real images; below 1: blurred; above 1: noisier or harsher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

LUMA = (0.299, 0.587, 0.114)


def high_frequency_share(images: Tensor, cutoff: float = 0.5) -> Tensor:
    """(N,) share of the luma energy above ``cutoff`` x Nyquist (radially) of (N, 3, H, W)
    images in [0, 1]; 0 for a flat image."""
    luma = torch.einsum("nchw,c->nhw", images.float(),
                        torch.tensor(LUMA, device=images.device))
    luma = luma - luma.mean(dim=(-2, -1), keepdim=True)
    mirrored = torch.cat([luma, luma.flip(-1)], -1)
    mirrored = torch.cat([mirrored, mirrored.flip(-2)], -2)
    power = torch.fft.fft2(mirrored).abs().square()
    fy = torch.fft.fftfreq(mirrored.shape[-2], device=images.device)
    fx = torch.fft.fftfreq(mirrored.shape[-1], device=images.device)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5  # 1 = Nyquist
    high = power[:, radius > cutoff].sum(-1)
    return high / power.flatten(1).sum(-1).clamp_min(1e-12)


class Sharpness(nn.Module):
    """Per-image sharpness ``share(image) / mean share(real images)`` (see the module
    docstring); the suite gives it the real images with ``set_reference``."""

    needs_reference = True

    def __init__(self, cutoff: float = 0.5):
        super().__init__()
        if not 0 < cutoff < 1:
            raise ValueError(f"metrics.sharpness_cutoff={cutoff!r} must lie in (0, 1) (a "
                             "fraction of the Nyquist frequency)")
        self.cutoff = cutoff
        self.register_buffer("reference", torch.tensor(float("nan")))

    @property
    def has_reference(self) -> bool:
        return bool(torch.isfinite(self.reference))

    @torch.no_grad()
    def set_reference(self, images: Tensor) -> None:
        """The mean high-frequency share of the real images (replaces an earlier one)."""
        share = float(high_frequency_share(images, self.cutoff).mean())
        if not share > 0:
            raise ValueError("Sharpness: the reference images have no high-frequency energy")
        self.reference.fill_(share)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        if not self.has_reference:
            raise RuntimeError("Sharpness: no reference; call set_reference(real images)")
        return high_frequency_share(images, self.cutoff) / self.reference
