"""Small generated image folders and tar shards, good and planted-bad samples (tests only)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

#: (mode, width, height) of the good images: varied sizes and every mode that must become RGB.
GOOD = [("RGB", 40, 30), ("L", 32, 48), ("CMYK", 36, 36), ("P", 50, 33), ("RGBA", 33, 41),
        ("RGB", 64, 40), ("LA", 35, 35), ("RGB", 31, 60)]


def image_bytes(mode: str, width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.quantize(16)
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    elif mode != "RGB":
        image = image.convert(mode)
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, fmt, quality=90) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    data = image_bytes("RGB", 48, 48, seed, "JPEG")
    return data[: len(data) // 2]


def bad_samples(min_size: int = 24) -> list[tuple[str, str, bytes, str | None]]:
    """(reason, name, image bytes, caption) of one planted bad sample per reason."""
    return [
        ("corrupt_image", "bad_truncated.jpg", truncated_jpeg(1), "a truncated photo"),
        ("empty_file", "bad_empty.png", b"", "an empty file"),
        ("not_an_image", "bad_text.jpg", b"this is not an image at all", "some text"),
        ("missing_caption", "bad_nocaption.png", image_bytes("RGB", 40, 40, 2), None),
        ("empty_caption", "bad_blank.png", image_bytes("RGB", 40, 40, 3), "   \n"),
        ("too_small", "bad_small.png", image_bytes("RGB", min_size - 4, 50, 4), "tiny"),
    ]


def good_image(k: int) -> tuple[str, bytes]:
    """Good image ``k``: (extension, bytes); PNG, JPEG (CMYK always) or WebP by ``k``."""
    mode, width, height = GOOD[k % len(GOOD)]
    fmt = "JPEG" if mode == "CMYK" or (mode in ("RGB", "L") and k % 2) else "PNG"
    fmt = "WEBP" if mode == "RGB" and k % 5 == 0 else fmt
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    return ext, image_bytes(mode, width, height, 100 + k, fmt)


def good_samples(count: int = len(GOOD)) -> list[tuple[str, bytes, str]]:
    """(name, image bytes, caption) of good samples with the varied modes of ``GOOD``."""
    out = []
    for k in range(count):
        ext, data = good_image(k)
        out.append((f"good_{k:03d}.{ext}", data, f"caption number {k}"))
    return out


def make_folder(root: Path, good: int = len(GOOD), bad: bool = True, metadata: bool = False,
                min_size: int = 24) -> tuple[list[str], dict[str, int]]:
    """Write a folder (good images in sub-folders); return the good captions in path order and
    the planted bad counts by reason. With ``metadata`` the captions go to metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    entries = [(f"sub{k % 2}/{name}", data, text) for k, (name, data, text)
               in enumerate(good_samples(good))]
    planted = {}
    if bad:
        for reason, name, data, text in bad_samples(min_size):
            entries.append((name, data, text))
            planted[reason] = planted.get(reason, 0) + 1
    lines = []
    for name, data, text in entries:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if text is not None and metadata:
            lines.append(json.dumps({"file_name": name, "text": text}))
        elif text is not None:
            path.with_suffix(".txt").write_text(text)
    if metadata:  # plus a stale sibling caption that the metadata overrides
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (root / entries[0][0]).with_suffix(".txt").write_text("a stale sibling caption")
    (root / "notes.md").write_text("not an image: ignored")
    ordered = sorted((name, text) for name, _, text in entries if name.split("/")[-1]
                     .startswith("good"))
    return [text for _, text in ordered], planted


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar of ``(key, {ext: bytes})`` samples in the webdataset layout (key.ext members)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def shard_samples(start: int, count: int, caption_key: str = "txt") -> list:
    """Good webdataset samples ``start .. start+count-1`` (caption in txt or a json field)."""
    out = []
    for k in range(start, start + count):
        ext, image = good_image(k)
        text = f"caption number {k}"
        members = {ext: image}
        if caption_key == "txt":
            members["txt"] = text.encode()
        else:
            members["json"] = json.dumps({caption_key: text, "index": k}).encode()
        out.append((f"{k:06d}", members))
    return out
