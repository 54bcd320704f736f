"""Reference FID statistics (mean and covariance of the feature extractor on the reference
images), cached on disk so that a large reference set is encoded once.

The cache key hashes every reference file (resolved path, size, modification time), the
resolution the images are resized to, and the feature extractor's identity (its class, its
weights and its scalar settings such as ``antialias``): changing any of them computes and
stores new statistics under a new key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tdd.metrics.eval_sets import image_batches

CACHE_VERSION = 1


@dataclass(frozen=True)
class ReferenceStatistics:
    """Mean (D,) and covariance (D, D) in float64 of ``num_samples`` feature vectors."""

    mean: Tensor
    cov: Tensor
    num_samples: int

    @classmethod
    def of(cls, features: Iterable[Tensor]) -> ReferenceStatistics:
        """Accumulate sums in float64 over batches of (B, D) features."""
        total = outer = None
        count = 0
        for batch in features:
            batch = batch.detach().reshape(len(batch), -1).double().cpu()
            total = batch.sum(0) if total is None else total + batch.sum(0)
            outer = batch.T @ batch if outer is None else outer + batch.T @ batch
            count += len(batch)
        if count < 2:
            raise ValueError(f"FID reference statistics need >= 2 images, got {count}")
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        return cls(mean, cov, count)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"mean": self.mean.contiguous(), "cov": self.cov.contiguous()}, str(tmp),
                  metadata={"num_samples": str(self.num_samples)})
        tmp.replace(path)  # atomic: a killed run never leaves half a file under the key

    @classmethod
    def load(cls, path: Path) -> ReferenceStatistics:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            count = int(handle.metadata()["num_samples"])
        tensors = load_file(str(path))
        return cls(tensors["mean"], tensors["cov"], count)


def extractor_identity(module: nn.Module) -> str:
    """A digest of a feature extractor: class names, weights and scalar settings."""
    digest = hashlib.sha256()
    for name, sub in module.named_modules():
        digest.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}".encode())
        settings = {k: v for k, v in sorted(vars(sub).items())
                    if not k.startswith("_") and k != "training"
                    and isinstance(v, (bool, int, float, str, tuple))}
        digest.update(repr(settings).encode())
    digest_tensors(digest, module.state_dict().items())
    return digest.hexdigest()


def digest_tensors(digest, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Feed each tensor's name, dtype, shape and bytes to ``digest``, in name order."""
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())


def cache_key(paths: Sequence[Path], resolution: int, extractor: str) -> str:
    """Hash of the reference files (path, size, mtime), the resolution and the extractor."""
    files = []
    for path in paths:
        stat = Path(path).stat()
        files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    record = {"version": CACHE_VERSION, "resolution": resolution, "extractor": extractor,
              "files": files}
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def reference_statistics(
    paths: Sequence[Path],
    feature: nn.Module,
    resolution: int,
    cache_dir: str | Path | None,
    batch_size: int = 32,
) -> tuple[ReferenceStatistics, Path | None, bool]:
    """Statistics of ``feature`` on the images at ``paths`` (resized to ``resolution``).

    Returns (statistics, cache file, whether it was read from the cache). ``cache_dir=None``
    computes without caching.
    """
    cache = None
    if cache_dir is not None:
        key = cache_key(paths, resolution, extractor_identity(feature))
        cache = Path(str(cache_dir)).expanduser() / f"{key}.safetensors"
        if cache.is_file():
            return ReferenceStatistics.load(cache), cache, True
    device = next((t.device for t in (*feature.parameters(), *feature.buffers())),
                  torch.device("cpu"))
    with torch.no_grad():
        stats = ReferenceStatistics.of(
            feature(batch.to(device)) for batch in image_batches(paths, resolution, batch_size)
        )
    if cache is not None:
        stats.save(cache)
        note = {"num_images": len(paths), "resolution": resolution,
                "first_image": str(paths[0]), "extractor": type(feature).__name__}
        cache.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n")
    return stats, cache, False
