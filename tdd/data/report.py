"""Counting what a training source reads and skips, across loader workers and ranks.

Loader workers are separate processes, so they never count into shared state: every sample they
return carries ``_seen`` (how many samples it stands for: itself plus the bad ones read before it)
and ``_skipped`` (``(reason, path)`` of each of those bad ones, or of a bad shard). :func:`collate`
sums them into ``batch["_report"]``, which the data module counts in the main process.
"""

from __future__ import annotations

from collections import Counter

import torch

#: Below this many samples seen, the share of bad ones is too noisy to stop a run.
MIN_SEEN = 20
#: A reason that counts a whole shard, not a sample; it is left out of the bad share.
BAD_SHARD = "bad_shard"


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short snake_case key (the metric suffix)."""

    def __init__(self, reason: str, path: str, detail: str = ""):
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.reason, self.path = reason, path


class DataReport:
    """Samples seen, skipped ones by reason with an example path, and the bad-share stop."""

    def __init__(self, max_bad_fraction: float = 0.5):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction} outside [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def update(self, seen: int, skipped: list[tuple[str, str]]) -> None:
        self.seen += seen
        for reason, path in skipped:
            self.skipped[reason] += 1
            self.examples.setdefault(reason, path)

    @property
    def bad(self) -> int:
        return sum(n for reason, n in self.skipped.items() if reason != BAD_SHARD)

    def check(self) -> None:
        """Stop when more than ``max_bad_fraction`` of at least MIN_SEEN samples were bad."""
        if self.seen < MIN_SEEN or self.bad <= self.max_bad_fraction * self.seen:
            return
        reason, count = max(((r, n) for r, n in self.skipped.items() if r != BAD_SHARD),
                            key=lambda item: item[1])
        raise RuntimeError(
            f"data: {self.bad} of the {self.seen} samples read were bad, more than "
            f"data.max_bad_fraction={self.max_bad_fraction}; the commonest reason is "
            f"{reason!r} ({count}), e.g. {self.examples[reason]}")

    def metrics(self) -> dict[str, float]:
        return {f"data/skipped_{reason}": float(n) for reason, n in self.skipped.items()}

    def summary(self) -> dict:
        return {"seen": self.seen, "skipped": dict(sorted(self.skipped.items()))}

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.skipped = Counter(state["skipped"])
        self.examples = dict(state.get("examples", {}))

    def gathered(self) -> DataReport:
        """The counts of every rank summed (this report itself when not distributed)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state_dict())
        total = DataReport(self.max_bad_fraction)
        for state in states:
            total.update(state["seen"], [])
            total.skipped.update(state["skipped"])
            for reason, path in state["examples"].items():
                total.examples.setdefault(reason, path)
        return total


def collate(items: list[dict]) -> dict:
    """Stack samples into a batch; their ``_seen``/``_skipped`` into ``batch["_report"]``."""
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
             "caption": [item["caption"] for item in items]}
    for key in ("original_size", "crop_top_left"):
        if all(key in item for item in items):
            batch[key] = torch.stack([item[key] for item in items])
    batch["_report"] = {"seen": sum(item["_seen"] for item in items),
                        "skipped": [entry for item in items for entry in item["_skipped"]]}
    positions = [item["_position"] for item in items if "_position" in item]
    if positions:
        batch["_report"]["position"] = positions[-1]
    return batch
