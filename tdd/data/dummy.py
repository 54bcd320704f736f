"""Random images with fixed captions: the smallest data module that exercises the whole step."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from tdd.data.samplers import ResumableData

CAPTIONS = (
    "a large red striped circle at the top left on a black background",
    "a small blue square in the center on a white background",
    "a green dotted triangle at the bottom right on a gray background",
    "a yellow circle and a purple square on a black background",
)


class DummyImages(Dataset):
    """Deterministic random images (seeded per index) with captions cycling over ``CAPTIONS``."""

    def __init__(self, size: int = 64, resolution: int = 32, seed: int = 0):
        if size <= 0 or resolution <= 0:
            raise ValueError(f"data: size ({size}) and resolution ({resolution}) must be positive")
        self.size, self.resolution, self.seed = size, resolution, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.rand(3, self.resolution, self.resolution, generator=generator) * 2 - 1
        return {"pixel_values": image, "caption": CAPTIONS[index % len(CAPTIONS)]}


class DummyDataModule(ResumableData):
    def __init__(
        self, batch_size: int = 4, size: int = 64, resolution: int = 32, seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = DummyImages(size, resolution, seed)

    def evaluation_set(self, n: int) -> tuple[list[str], torch.Tensor]:
        """``n`` fixed prompts and as many held-out reference images in [0, 1]."""
        held_out = DummyImages(n, self.dataset.resolution, seed=self.dataset.seed + 1)
        items = [held_out[k] for k in range(n)]
        images = torch.stack([item["pixel_values"] for item in items]) * 0.5 + 0.5
        return [item["caption"] for item in items], images

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=self.train_sampler(len(self.dataset), self.dataset.seed, shuffle=True),
            drop_last=True,
        )
