"""A real CLIPTokenizer built offline from the BPE vocabulary that open_clip ships."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

_NUM_MERGES = 49152 - 256 - 2


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2 style byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=None)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges as open_clip ships them (ids 49406 start, 49407 end)."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A new CLIPTokenizer with the real CLIP vocabulary, built without network access.

    The vocabulary is read once; each call returns its own tokenizer, since a fast tokenizer
    keeps the padding of its last call and would save it with the model."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
