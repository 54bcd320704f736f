"""Evaluation sets from local files: prompts, and reference images where the set has them.

``evaluation.dataset`` accepts
- a folder of images (jpg, jpeg, png, webp, found recursively) each with its caption in a
  sibling ``<name>.txt``, or listed in a ``metadata.jsonl`` (``file_name``, ``text``) at the root;
- a ``.jsonl`` file of ``{"file_name": ..., "text": ...}`` lines (image paths relative to the
  file; ``image``/``caption``/``prompt`` are accepted too); without an image key, prompts only;
- the COCO captions layout: ``captions_val2014.json`` (or any COCO captions file, or a folder
  holding one, also under ``annotations/``) next to its images folder (``val2014/``,
  ``images/`` or the file's own folder); one caption per image, drawn with the seed;
- a prompts-only file: ``.txt`` (one prompt per line) or ``.tsv`` with a ``Prompt`` column (as
  PartiPrompts ships). Such a set has no reference images: CLIP and aesthetic scores only.

A set larger than ``evaluation.num_images`` is cut to a seeded subset (kept in file order).
Everything here only lists and checks files, so a bad set fails before any model is loaded.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SETTING = "evaluation.dataset"
_IMAGE_KEYS = ("file_name", "image", "path")
_TEXT_KEYS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class EvaluationSet:
    """Prompts and, when the source has them, one reference image file per prompt."""

    prompts: list[str]
    images: list[Path] | None
    source: str

    @property
    def has_images(self) -> bool:
        return self.images is not None


def load_evaluation_set(source: str | Path, num_images: int, seed: int = 0) -> EvaluationSet:
    """Read ``source`` (see the module docstring) and keep ``num_images`` items of it."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{SETTING}: {path} does not exist")
    prompts, images = _read(path, seed)
    if not prompts:
        raise ValueError(f"{SETTING}: no prompts found in {path}")
    if len(prompts) < num_images:
        raise ValueError(
            f"evaluation.num_images={num_images} but {SETTING}={path} holds {len(prompts)} "
            "items: lower evaluation.num_images or give a larger set"
        )
    keep = _subset(len(prompts), num_images, seed)
    prompts = [prompts[k] for k in keep]
    images = None if images is None else [images[k] for k in keep]
    missing = [image for image in images or [] if not image.is_file()]
    if missing:
        raise FileNotFoundError(f"{SETTING}: {len(missing)} reference images of {path} are "
                                f"missing, e.g. {missing[0]}")
    return EvaluationSet(prompts, images, str(path))


def _read(path: Path, seed: int) -> tuple[list[str], list[Path] | None]:
    coco = _coco_file(path)
    if coco is not None:
        return _read_coco(coco, seed)
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, path.parent)
    if suffix == ".tsv":
        return _read_tsv(path), None
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()], None
    raise ValueError(
        f"{SETTING}: {path} is not a folder, .jsonl, COCO captions .json, .txt or .tsv file"
    )


def _subset(total: int, n: int, seed: int) -> list[int]:
    """A seeded choice of ``n`` of ``total`` indices, in ascending order."""
    if n >= total:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:n].tolist())


# -- folders and JSONL -------------------------------------------------------------------------
def _read_folder(root: Path) -> tuple[list[str], list[Path]]:
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        return _read_jsonl(metadata, root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [(p, p.with_suffix(".txt")) for p in files]
    pairs = [(p, t.read_text(encoding="utf-8").strip()) for p, t in pairs if t.is_file()]
    pairs = [(p, text) for p, text in pairs if text]
    if files and not pairs:
        raise ValueError(f"{SETTING}: {root} has images but no captions (<name>.txt beside "
                         "each image, or a metadata.jsonl)")
    return [text for _, text in pairs], [p for p, _ in pairs]


def _first(record: dict, keys: Sequence[str]):
    return next((record[k] for k in keys if record.get(k) not in (None, "")), None)


def _read_jsonl(path: Path, root: Path) -> tuple[list[str], list[Path] | None]:
    prompts, images = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{SETTING}: {path} line {number}: {error}") from error
        text = _first(record, _TEXT_KEYS)
        if text is None:
            raise ValueError(f"{SETTING}: {path} line {number} has no {'/'.join(_TEXT_KEYS)}")
        prompts.append(str(text).strip())
        image = _first(record, _IMAGE_KEYS)
        images.append(None if image is None else _existing(root / image, path, number))
    if all(image is None for image in images):
        return prompts, None
    if any(image is None for image in images):
        raise ValueError(f"{SETTING}: {path} lists images for some lines only")
    return prompts, images


def _existing(image: Path, listing: Path, number: int) -> Path:
    if not image.is_file():
        raise FileNotFoundError(f"{SETTING}: {listing} line {number}: no image {image}")
    return image


def _read_tsv(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if "Prompt" not in (reader.fieldnames or []):
            raise ValueError(f"{SETTING}: {path} has no 'Prompt' column "
                             f"(columns: {reader.fieldnames})")
        return [row["Prompt"].strip() for row in reader if (row["Prompt"] or "").strip()]


# -- COCO ----------------------------------------------------------------------------------------
def _coco_file(path: Path) -> Path | None:
    """The COCO captions file ``path`` is or holds (directly or under ``annotations/``)."""
    if path.is_file():
        return path if path.suffix.lower() == ".json" else None
    for folder in (path, path / "annotations"):
        found = sorted(folder.glob("captions_*.json")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def _read_coco(path: Path, seed: int) -> tuple[list[str], list[Path]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = sorted(data["images"], key=lambda image: image["id"])
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{SETTING}: {path} is not a COCO captions file: {error!r}") from error
    captions: dict[int, list[tuple[int, str]]] = {}
    for note in annotations:
        captions.setdefault(note["image_id"], []).append((note["id"], note["caption"].strip()))
    images = [image for image in images if captions.get(image["id"])]
    if not images:
        return [], []
    folder = _coco_images(path, images[0]["file_name"])
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for image in images:  # one caption per image, drawn with the seed
        options = sorted(captions[image["id"]])
        pick = int(torch.randint(len(options), (), generator=generator))
        prompts.append(options[pick][1])
    return prompts, [folder / image["file_name"] for image in images]


def _coco_images(path: Path, example: str) -> Path:
    stem = path.stem.replace("captions_", "")  # captions_val2014 -> val2014
    candidates = [path.parent / stem, path.parent.parent / stem, path.parent / "images",
                  path.parent.parent / "images", path.parent]
    for folder in candidates:
        if (folder / example).is_file():
            return folder
    raise FileNotFoundError(
        f"{SETTING}: images of {path} not found (looked for {example} in "
        f"{', '.join(str(c) for c in candidates)})"
    )


# -- reference images ----------------------------------------------------------------------
def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) in [0, 1]: RGB, short side resized to ``resolution``, centre crop."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as image:
            pixels = pil_to_tensor(image.convert("RGB")).float() / 255
    except OSError as error:
        raise ValueError(f"{SETTING}: cannot read reference image {path}: {error}") from error
    height, width = pixels.shape[-2:]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        pixels = F.interpolate(pixels[None], size=size, mode="bicubic", antialias=True,
                               align_corners=False)[0]
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return pixels[:, top:top + resolution, left:left + resolution].clamp(0, 1)


def image_batches(
    paths: Sequence[Path], resolution: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """The reference images as (B, 3, R, R) batches, read lazily."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        yield torch.stack([load_image(p, resolution) for p in chunk])
