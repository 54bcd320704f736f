"""Decoding and the training transform of the published text-to-image scripts.

Resize the short side to the resolution, flip at random (optional), crop (center or random),
scale to [-1, 1]. Each sample also carries its ``original_size`` (h, w) before resizing and the
``crop_top_left`` (top, left) in the resized (and flipped) image: the SDXL size conditioning.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from tdd.data.report import BadSample

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CROPS = ("center", "random")


def sample_generator(*key: int) -> torch.Generator:
    """A generator seeded from integers (seed, epoch, index...): one stream per sample."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def decode_image(data: bytes, path: str, min_size: int = 0) -> Image.Image:
    """Bytes -> an RGB image, or :class:`BadSample` naming why not.

    Grayscale, CMYK and palette images are converted; transparency is composited on white.
    """
    if not data:
        raise BadSample("empty_file", path)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises several types for "not an image"
        raise BadSample("not_an_image", path, str(error)) from None
    try:
        image.load()  # decodes everything: a truncated or corrupt file fails here
    except Exception as error:
        raise BadSample("corrupt_image", path, str(error)) from None
    if min(image.size) < min_size:
        raise BadSample("too_small", path, f"{image.width}x{image.height} < {min_size}")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode_caption(data: bytes | str | None, path: str) -> str:
    if data is None:
        raise BadSample("missing_caption", path)
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
    if not text.strip():
        raise BadSample("empty_caption", path)
    return text.strip()


class ImageTransform:
    """Resize the short side to ``resolution``, optional flip, center or random crop, [-1, 1]."""

    def __init__(self, resolution: int, crop: str = "center", flip: bool = False):
        if resolution <= 0:
            raise ValueError(f"data.resolution={resolution} must be positive")
        if crop not in CROPS:
            raise ValueError(f"data.crop={crop!r}; expected one of {CROPS}")
        self.resolution, self.crop, self.flip = resolution, crop, flip

    def __call__(self, image: Image.Image, generator: torch.Generator) -> dict:
        res = self.resolution
        height, width = image.height, image.width
        scale = res / min(height, width)
        size = (max(res, round(width * scale)), max(res, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        if self.flip and torch.rand((), generator=generator) < 0.5:
            image = ImageOps.mirror(image)
        if self.crop == "center":
            top, left = round((size[1] - res) / 2), round((size[0] - res) / 2)
        else:
            top = int(torch.randint(size[1] - res + 1, (), generator=generator))
            left = int(torch.randint(size[0] - res + 1, (), generator=generator))
        image = image.crop((left, top, left + res, top + res))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {"pixel_values": pixels.float() / 127.5 - 1.0,
                "original_size": torch.tensor([height, width]),
                "crop_top_left": torch.tensor([top, left])}
