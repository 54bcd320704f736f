"""Shared pieces of the toy-asset builders: data batches, degradations, checkpoints, records."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tdd.config import asset_path
from tdd.data.shapes import SceneSpec, render, training_scene

ASSETS = Path(asset_path("toy"))
MAX_BLUR_SIGMA = 1.2  # pixels at 32x32: degradation level 1 of the detail scale
MAX_NOISE_STD = 0.12  # in [0, 1] image units
#: How the builders name the evaluator in a missing-file error: the stage that builds it.
EVALUATOR_STAGE = "toy evaluator (python -m tdd.toy.build evaluator)"


@dataclass
class BuildSettings:
    """Where a builder reads and writes, and how long it trains (steps, not seconds)."""

    work: Path
    out: Path = ASSETS
    steps: int | None = None  # None: the builder's default
    batch_size: int | None = None  # None: the builder's default
    seed: int = 0
    eval_size: int = 2000
    log_every: int = 50
    ckpt_every_s: float = 120.0

    def work_dir(self, name: str) -> Path:
        path = Path(self.work) / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def training_batch(seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, list[SceneSpec]]:
    """Batch ``step`` of the training stream ``seed``: renders in [0, 1] and their specs."""
    pairs = [training_scene(seed, step * batch_size + i) for i in range(batch_size)]
    specs = [p[0] for p in pairs]
    return render(specs, [p[1] for p in pairs]), specs


def step_generator(seed: int, step: int) -> torch.Generator:
    """One generator per (builder seed, step): a resumed run draws the same numbers."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (pixels); sigma 0 leaves it unchanged."""
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (x[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K)
    b, c, h, w = images.shape
    flat = F.pad(images.reshape(1, b * c, h, w), [radius] * 4, mode="reflect")
    k = kernel.repeat_interleave(c, 0)
    flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def degrade(images: torch.Tensor, level: torch.Tensor, kind: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    """Controlled detail loss: ``kind`` 0 blur, 1 noise, 2 both, at ``level`` in [0, 1]."""
    blur = torch.where(kind != 1, level * MAX_BLUR_SIGMA, torch.zeros_like(level))
    noise = torch.where(kind != 0, level * MAX_NOISE_STD, torch.zeros_like(level))
    out = gaussian_blur(images, blur)
    out = out + noise[:, None, None, None] * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x)
        r = torch.empty_like(x, dtype=torch.float64)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # ties share their mean rank
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


class Checkpointer:
    """Saves and restores a builder's training state atomically under its work folder."""

    def __init__(self, folder: Path, every_s: float):
        self.path, self.every_s, self.last = folder / "state.pt", every_s, time.monotonic()

    def load(self, model: torch.nn.Module) -> dict | None:
        """The saved state, or None; refuses one whose ``"model"`` has other shapes than ``model``
        (another architecture), naming the file, before anything is overwritten."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        if _shapes(state.get("model", {})) != _shapes(model.state_dict()):
            raise ValueError(f"{self.path} holds a model of another architecture: move it away "
                             "(or pass another --work) to start afresh")
        return state

    def maybe_save(self, state_fn, step: int, force: bool = False) -> None:
        """Save ``state_fn(step)`` when ``every_s`` seconds have passed (or ``force``)."""
        if force or time.monotonic() - self.last >= self.every_s:
            tmp = self.path.with_suffix(".tmp")
            torch.save(state_fn(step), tmp)
            os.replace(tmp, self.path)
            self.last = time.monotonic()


def _shapes(state_dict: dict) -> dict:
    return {name: tuple(value.shape) for name, value in state_dict.items()}


class Progress:
    """Step, loss and time-left lines for long builds."""

    def __init__(self, name: str, total: int, start: int, every: int):
        self.name, self.total, self.start, self.every = name, total, start, every
        self.t0, self.acc, self.n = time.monotonic(), 0.0, 0

    def update(self, step: int, loss: float) -> None:
        self.acc, self.n = self.acc + loss, self.n + 1
        done = step + 1
        if done % self.every == 0 or done == self.total:
            rate = (time.monotonic() - self.t0) / max(done - self.start, 1)
            eta = rate * (self.total - done) / 60
            print(f"[{self.name}] step {done}/{self.total} loss {self.acc / self.n:.5f} "
                  f"{rate:.2f}s/step eta {eta:.1f} min", flush=True)
            self.acc, self.n = 0.0, 0


def update_record(out: Path, section: str, values: dict) -> dict:
    """Merge ``values`` into ``section`` of the quality record ``out/quality.json``."""
    path = Path(out) / "quality.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[section] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, max_norm: float = 1.0):
    """One optimizer step of a builder: backward, gradient-norm clip at ``max_norm``, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
