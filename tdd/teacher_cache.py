"""The teacher's evaluation rows, sampled once per machine: images on disk keyed by everything
that determines them.

A run scores its teacher rows (25-step DDIM with CFG by default: about half of the network
evaluations of the default evaluation) on the same prompts and per-image seeds as every other
run with that teacher, so the images are the same. :class:`TeacherSampleCache` keeps them in
``<dir>/<key>.pt`` (float32, exactly the sampled tensor) with the seconds the sampling took; the
key hashes the teacher's weights (its denoiser without any adapter, the text encoders and the
VAE), the prompts, seeds, steps, guidance scale, unconditional mode, batch size, sampler and
scheduler config, precision, device type and library versions. Anything else changes the key
and the row is sampled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from torch import nn

from tdd.metrics.reference_stats import digest_tensors

log = logging.getLogger(__name__)

CACHE_VERSION = 1
#: Rows larger than this (float32 images) are sampled every time, not stored.
MAX_BYTES = 2 * 2**30


def weights_identity(networks: dict[str, nn.Module]) -> str:
    """A digest of the networks' classes and weights. Adapter weights (``lora_``) are left out
    and peft's ``base_layer`` level is dropped from the names, so a LoRA student's teacher
    (adapters disabled) and the plain teacher hash alike."""
    digest = hashlib.sha1()
    for label, network in sorted(networks.items()):
        digest.update(f"{label}:{type(network).__qualname__}".encode())
        digest_tensors(digest, ((name.replace(".base_layer", ""), tensor)
                                for name, tensor in network.state_dict().items()
                                if "lora_" not in name))
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedRow:
    images: torch.Tensor
    nfe: int
    seconds: float


class TeacherSampleCache:
    """``load(key)`` / ``save(key, ...)`` of teacher rows under ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(str(directory)).expanduser()

    @staticmethod
    def key(teacher_id: str, prompts: Sequence[str], seeds: Sequence[int], **settings) -> str:
        record = {"version": CACHE_VERSION, "teacher": teacher_id,
                  "prompts": hashlib.sha1("\n".join(prompts).encode()).hexdigest(),
                  "seeds": [int(s) for s in seeds], "torch": torch.__version__,
                  "diffusers": diffusers.__version__, **settings}
        return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str) -> CachedRow | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return CachedRow(data["images"], int(data["nfe"]), float(data["seconds"]))
        except Exception as error:  # a damaged file is sampled again and overwritten
            log.warning("teacher sample cache %s unreadable (%s): sampling again", path, error)
            return None

    def save(self, key: str, row: CachedRow) -> bool:
        """Store ``row`` (atomically); False when it is larger than :data:`MAX_BYTES`."""
        size = row.images.numel() * 4
        if size > MAX_BYTES:
            log.info("teacher row of %.1f GiB not cached (limit %.1f GiB)", size / 2**30,
                     MAX_BYTES / 2**30)
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".{os.getpid()}.tmp")
        torch.save({"images": row.images.float().cpu().contiguous(), "nfe": row.nfe,
                    "seconds": row.seconds}, tmp)
        tmp.replace(self.path(key))  # a killed run never leaves half a file under the key
        return True
