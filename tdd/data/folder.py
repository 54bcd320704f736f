"""``data=folder``: image files found recursively under ``data.root``, each with a caption in a
sibling ``<name>.txt`` or in ``<root>/metadata.jsonl`` (``file_name``, ``text``), the Hugging
Face imagefolder convention; metadata wins where both exist.

Order: the sorted relative paths, shuffled per epoch from ``seed + epoch`` and split by rank
(:class:`~tdd.data.samplers.EpochShuffleSampler`); a resumed run continues mid-epoch exactly.
A bad file (unreadable, not an image, too small, no caption) is counted and its slot in the
batch is taken by a good sample of the same batch, so every batch keeps its size: ranks step
together under DDP and the resume count stays exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from tdd.data.report import BadSample, DataReport, collate
from tdd.data.samplers import ResumableData
from tdd.data.transforms import (
    EXTENSIONS,
    ImageTransform,
    decode_caption,
    decode_image,
    sample_generator,
)


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (any depth), sorted by their path relative to ``root``."""
    files = (p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_metadata(root: Path, report: DataReport) -> dict[str, str]:
    """``file_name -> text`` from ``<root>/metadata.jsonl``; unreadable lines are counted."""
    path = root / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[Path(entry["file_name"]).as_posix()] = str(entry.get("text") or "")
        except (ValueError, KeyError, TypeError):
            report.update(0, [("bad_metadata", f"{path}:{number}")])
    return captions


class FolderDataset(Dataset):
    """Index -> decoded, transformed image-caption pair; a bad one raises :class:`BadSample`."""

    def __init__(self, root: str | Path, transform: ImageTransform, seed: int = 0,
                 min_size: int = 0, report: DataReport | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} is not a directory")
        self.files = find_images(self.root)
        if not self.files:
            raise ValueError(f"data.root={str(root)!r} holds no {'/'.join(EXTENSIONS)} images")
        self.captions = read_metadata(self.root, report or DataReport())
        self.transform, self.seed, self.min_size = transform, seed, min_size

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        path = self.files[index]
        text = self.captions.get(path.relative_to(self.root).as_posix())
        sibling = path.with_suffix(".txt")
        if text is None and sibling.is_file():
            text = sibling.read_bytes()
        return decode_caption(text, str(path))

    def load(self, index: int, epoch: int = 0) -> dict:
        path = self.files[index]
        caption = self.caption(index)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadSample("unreadable", str(path), str(error)) from None
        image = decode_image(data, str(path), self.min_size)
        sample = self.transform(image, sample_generator(self.seed, epoch, index))
        return {**sample, "caption": caption}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.load(index, epoch)

    def __getitems__(self, keys: list) -> list[dict]:
        """One batch: bad files counted, their slots filled with the batch's good samples."""
        items, skipped = [], []
        for key in keys:
            try:
                items.append({**self[key], "_seen": 1, "_skipped": []})
            except BadSample as bad:
                skipped.append((bad.reason, bad.path))
        # a batch of bad files only: the next good file in path order stands in
        good = items or [self.first_good(keys[-1])]
        fillers = [{**good[k % len(good)], "_seen": 1, "_skipped": [entry]}
                   for k, entry in enumerate(skipped)]
        return items + fillers

    def first_good(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for step in range(1, len(self) + 1):
            try:
                return self.load((index + step) % len(self), epoch)
            except BadSample:
                continue
        raise ValueError(f"data.root={str(self.root)!r}: none of its {len(self)} images is "
                         "readable with a caption")


class FolderDataModule(ResumableData):
    """``data=folder``: see the module docstring."""

    def __init__(self, root: str, batch_size: int = 4, resolution: int = 512,
                 crop: str = "center", flip: bool = False, seed: int = 0, num_workers: int = 0,
                 min_size: int = 0, max_bad_fraction: float = 0.5):
        super().__init__(max_bad_fraction, min_size)
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if root in (None, "", "???"):
            raise ValueError("data.root is not set: give a folder of images and captions")
        self.batch_size, self.num_workers = batch_size, num_workers
        transform = ImageTransform(resolution, crop, flip)
        self.dataset = FolderDataset(root, transform, seed, min_size, self.data_report)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(len(self.dataset), self.dataset.seed, shuffle=True,
                                     with_epoch=True)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate, drop_last=True,
                          persistent_workers=self.num_workers > 0)

    def evaluation_set(self, n: int) -> tuple[list[str], torch.Tensor]:
        """The first ``n`` good pairs in path order, center-cropped, images in [0, 1]."""
        center = ImageTransform(self.dataset.transform.resolution)
        prompts, images = [], []
        for index in range(len(self.dataset)):
            if len(prompts) == n:
                break
            try:
                caption = self.dataset.caption(index)
                path = self.dataset.files[index]
                image = decode_image(path.read_bytes(), str(path), self.min_size)
            except BadSample:
                continue
            prompts.append(caption)
            images.append(center(image, sample_generator(0))["pixel_values"] * 0.5 + 0.5)
        return prompts, torch.stack(images)
