"""``data=webdataset``: image-caption samples streamed from tar shards (the ``webdataset``
library reads the tars and groups their members by key).

``data.urls``: a tar path, a directory of ``*.tar``, a brace pattern
(``shards/{00000..00099}.tar``) or a list of these. A sample's image is its first
``jpg``/``jpeg``/``png``/``webp`` member; its caption the ``txt`` member, or with any other
``data.caption_key`` that field of its ``json`` member.

The stream is endless: epoch ``e`` visits every shard in an order shuffled from ``seed + e``.
Loader slot ``rank * num_workers + worker`` reads every ``slots``-th shard of that order; with
fewer shards than slots, every slot reads every shard and keeps every ``slots``-th sample of
each. Samples pass a seeded shuffle buffer of ``data.shuffle_buffer`` (<= 1: none). Ranks never
run dry at different times, so ``trainer.max_steps`` ends the run.

A bad sample is counted and dropped; a shard that cannot be opened or is truncated is reported
with its path and the rest of it skipped (the samples read before the damage are kept).
A pass over a slot's shards that reads no sample at all, or 10 000 bad samples in a row, stops
the run with a message (as does a bad share above ``data.max_bad_fraction``).

Resume: each batch carries its slot's read position (epoch, shard in the pass, samples read in
that shard); the checkpoint holds the latest per slot, and a resumed slot reopens that shard and
skips what it had read. Exact, for the same world size and num_workers, when
``shuffle_buffer <= 1``: every slot then continues with the very samples (and crops) the
uninterrupted run would have drawn; the DataLoader restarts its round over the workers at worker
0. With a larger buffer the samples that sat in it are left out of that epoch and the order
after the resume differs.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from tdd.data.report import BAD_SHARD, BadSample, DataReport, collate
from tdd.data.samplers import ResumableData
from tdd.data.transforms import ImageTransform, decode_caption, decode_image, sample_generator

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_BAD_IN_A_ROW = 10_000


def expand_shards(urls) -> list[str]:
    """``data.urls`` -> shard paths (brace patterns expanded, directories listed)."""
    if urls in (None, "", "???"):
        raise ValueError("data.urls is not set: give tar shards (a path, a pattern or a list)")
    entries = [urls] if isinstance(urls, str) else list(urls)
    shards = []
    for entry in entries:
        for url in expand_urls(str(entry)):
            path = Path(url).expanduser()
            shards += sorted(map(str, path.glob("*.tar"))) if path.is_dir() else [str(path)]
    if not any(Path(s).is_file() for s in shards):
        raise FileNotFoundError(f"data.urls={urls!r}: no tar shard found (expanded to "
                                f"{len(shards)} path(s), e.g. {shards[:2]})")
    return shards


def read_shard(url: str, skip: int = 0) -> Iterator[dict]:
    """The samples of one tar (grouped by key) after the first ``skip``; damage raises."""
    with open(url, "rb") as stream:
        files = tar_file_expander([{"url": url, "stream": stream}])
        for number, sample in enumerate(group_by_keys(files)):
            if number >= skip:
                yield sample


class ShardStream(IterableDataset):
    """The endless, split, shuffled sample stream described in the module docstring."""

    def __init__(self, shards: list[str], transform: ImageTransform, caption_key: str = "txt",
                 shuffle_buffer: int = 1000, seed: int = 0, min_size: int = 0,
                 max_bad_fraction: float = 0.5):
        self.shards, self.transform, self.caption_key = shards, transform, caption_key
        self.shuffle_buffer, self.seed, self.min_size = shuffle_buffer, seed, min_size
        self.max_bad_fraction = max_bad_fraction
        self.rank, self.world_size = 0, 1
        self.positions: dict[int, tuple[int, int, int]] = {}  # slot -> where to resume

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        start = self.positions.get(slot, (0, 0, 0))
        raw = self._raw(slot, slots, start)
        rng = random.Random(f"{self.seed}/{slot}/{start}")
        yield from self._decoded(_shuffled(raw, self.shuffle_buffer, rng), slot)

    def _raw(self, slot: int, slots: int, start: tuple[int, int, int]) -> Iterator[dict]:
        """Undecoded samples of this slot with the reader's position after each."""
        epoch, first, skip = start
        while True:
            order = self.epoch_order(epoch)
            mine = order[slot::slots] if len(order) >= slots else order
            keep = 1 if len(order) >= slots else slots
            read_any = False
            for cursor in range(first, len(mine)):
                shard = mine[cursor]
                url = self.shards[shard]
                number = skip
                try:
                    for number, sample in enumerate(read_shard(url, skip), skip + 1):
                        read_any = True
                        if (number - 1) % keep == slot % keep:
                            yield {**sample, "_key": (epoch, shard, number - 1),
                                   "_position": (slot, (epoch, cursor, number))}
                except Exception as error:  # unopenable, truncated or not a tar
                    detail = error.args[0] if error.args else error
                    log.warning("data.urls: skipped shard %s after %d samples: %s: %s",
                                url, number, type(error).__name__, detail)
                    yield {"_bad_shard": url}
                skip = 0
            if not read_any and first == 0:
                raise RuntimeError(f"data.urls: a pass over {len(mine)} shard(s) of slot {slot} "
                                   f"read no sample, e.g. {self.shards[mine[0]]}")
            epoch, first = epoch + 1, 0

    def _decoded(self, raw: Iterator[dict], slot: int) -> Iterator[dict]:
        report = DataReport(self.max_bad_fraction)  # this worker's share, for the stop
        pending: list[tuple[str, str]] = []
        since_good = 0
        for sample in raw:
            if "_bad_shard" in sample:
                pending.append((BAD_SHARD, sample["_bad_shard"]))
                continue
            since_good += 1
            try:
                item = self.decode(sample)
            except BadSample as bad:
                pending.append((bad.reason, bad.path))
                report.update(1, [(bad.reason, bad.path)])
                report.check()
                if since_good > MAX_BAD_IN_A_ROW:  # only reachable with max_bad_fraction=1
                    raise RuntimeError(f"data.urls: slot {slot} read {since_good} samples in a "
                                       f"row and none was good, e.g. {bad.path}") from None
                continue
            report.update(1, [])
            yield {**item, "_seen": since_good, "_skipped": pending,
                   "_position": sample["_position"]}
            pending, since_good = [], 0

    def decode(self, sample: dict) -> dict:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise BadSample("missing_image", name)
        if self.caption_key == "txt":
            caption = sample.get("txt")
        else:
            try:
                caption = json.loads(sample["json"])[self.caption_key]
            except (KeyError, ValueError, TypeError):
                caption = None
        caption = decode_caption(caption, name)
        image = decode_image(sample[key], name, self.min_size)
        generator = sample_generator(self.seed, *sample["_key"])
        return {**self.transform(image, generator), "caption": caption}


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of ``size`` samples; each sample yielded carries the latest position."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    latest = None
    for sample in samples:
        buffer.append(sample)
        latest = sample.get("_position", latest)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield {**buffer.pop(), "_position": latest}
    rng.shuffle(buffer)
    yield from buffer


class WebDataModule(ResumableData):
    """``data=webdataset``: see the module docstring."""

    def __init__(self, urls, batch_size: int = 4, resolution: int = 512, crop: str = "center",
                 flip: bool = False, caption_key: str = "txt", shuffle_buffer: int = 1000,
                 seed: int = 0, num_workers: int = 0, min_size: int = 0,
                 max_bad_fraction: float = 0.5):
        super().__init__(max_bad_fraction, min_size)
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = ShardStream(expand_shards(urls), ImageTransform(resolution, crop, flip),
                                   caption_key, shuffle_buffer, seed, min_size, max_bad_fraction)
        self.positions: dict[int, tuple] = {}

    def train_dataloader(self) -> DataLoader:
        self.dataset.rank, self.dataset.world_size = self.rank_and_world()
        self.dataset.positions = dict(self.positions)
        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        position = batch.get("_report", {}).get("position") if isinstance(batch, dict) else None
        if position is not None:
            slot, where = position
            self.positions[slot] = where
        return super().on_before_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict:
        state = super().state_dict()
        positions = dict(self.positions)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, positions)
            positions = {k: v for part in gathered for k, v in part.items()}
        return {**state, "positions": positions}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.positions = {int(k): tuple(v) for k, v in state.get("positions", {}).items()}
