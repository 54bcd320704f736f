"""A real CLIPTokenizer built offline from the BPE vocabulary that open_clip ships."""

from __future__ import annotations

import gzip
from functools import lru_cache

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

_NUM_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=None)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges as open_clip ships them (ids 49406 start, 49407 end)."""
    lines = gzip.open(default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())  # byte-level BPE's 256 stand-ins
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A new CLIPTokenizer with the real CLIP vocabulary, built without network access.

    The vocabulary is read once; each call returns its own tokenizer, since a fast tokenizer
    keeps the padding of its last call and would save it with the model."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
