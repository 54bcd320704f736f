"""Loader throughput of the two file sources on generated JPEGs (images/s).

    python -m tdd.data.throughput --dir /tmp/tdd-throughput --images 200 --workers 2

Writes ``--images`` random-texture JPEGs of ``--size`` px (with captions) once as a folder and as
tar shards of 50, then times one pass of each loader at ``--resolution`` after a warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tdd.data.folder import FolderDataModule
from tdd.data.webdataset import WebDataModule


def write_sources(root: Path, images: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """The same generated pairs as a folder (jpg + txt) and as shards of 50 samples."""
    folder, shards = root / "folder", root / "shards"
    if (root / "done.json").is_file():
        return folder, shards
    folder.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(images):
        low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(
            folder / f"{k:06d}.jpg", quality=90)
        (folder / f"{k:06d}.txt").write_text(f"generated texture number {k}")
    for first in range(0, images, 50):
        with tarfile.open(shards / f"{first // 50:05d}.tar", "w") as tar:
            for k in range(first, min(first + 50, images)):
                for ext in ("jpg", "txt"):
                    tar.add(folder / f"{k:06d}.{ext}", arcname=f"{k:06d}.{ext}")
    (root / "done.json").write_text(json.dumps({"images": images, "size": size}))
    return folder, shards


def images_per_second(module, images: int) -> float:
    loader = iter(module.train_dataloader())
    next(loader)  # warm-up: workers started, first batch decoded
    count, start = 0, time.perf_counter()
    while count < images - 2 * module.batch_size:
        count += len(next(loader)["caption"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/tdd-throughput")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    folder, shards = write_sources(Path(args.dir), args.images, args.size)
    common = dict(batch_size=args.batch_size, resolution=args.resolution,
                  num_workers=args.workers)
    result = {
        "folder": images_per_second(FolderDataModule(str(folder), **common), args.images),
        "webdataset": images_per_second(
            WebDataModule(str(shards), shuffle_buffer=100, **common), args.images),
    }
    print(json.dumps({**vars(args), "images_per_second": result}, indent=2))


if __name__ == "__main__":
    main()
