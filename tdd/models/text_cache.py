"""An LRU cache of encoded captions: with a frozen text encoder a caption always encodes alike,
so data whose captions repeat (a finite caption grammar, a few prompts per image) can skip it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from tdd.models.conditioning import Conditioning


class TextCache:
    """``cache(captions)`` equals ``text(captions)``; the last ``size`` distinct captions are
    kept (on the encoder's device, one row each) and only the others go through ``text``."""

    def __init__(self, text: Callable[[list[str]], Conditioning], size: int):
        if size <= 0:
            raise ValueError(f"module.cache_text={size}: the number of cached captions must be "
                             "positive (0 turns the cache off)")
        self.text, self.size = text, size
        self._rows: OrderedDict[str, tuple[torch.Tensor, dict]] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, captions: list[str]) -> Conditioning:
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        self.misses += len(missing)
        self.hits += len(set(captions)) - len(missing)
        if missing:
            encoded = self.text(missing)
            for k, caption in enumerate(missing):
                self._rows[caption] = (encoded.hidden[k],
                                       {name: v[k] for name, v in encoded.added.items()})
        rows = [self._rows[c] for c in captions]
        for caption in captions:
            self._rows.move_to_end(caption)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        added = {name: torch.stack([r[1][name] for r in rows]) for name in rows[0][1]}
        return Conditioning(torch.stack([r[0] for r in rows]), added)

    def clear(self) -> None:
        self._rows.clear()
