"""What a sampler setting costs: network evaluations (NFE) and wall time per image."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingCost:
    """NFE per image (from the sampler) and the seconds it took to make ``images`` images."""

    nfe: int
    seconds: float
    images: int

    def as_dict(self) -> dict[str, float]:
        if self.images < 1:
            raise ValueError("SamplingCost: no images were made; time per image is undefined")
        return {"nfe": float(self.nfe), "sec_per_image": self.seconds / self.images}


class Stopwatch:
    """Wall time of a block; waits for queued GPU work on ``device`` at both ends."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: float | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start
