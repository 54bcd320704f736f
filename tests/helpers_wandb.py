"""Read the metrics of an offline W&B run without a server (what the evaluation tests check)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7  # leveldb-log record header: crc32 (4), length (2, little endian), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes):
    """Payloads of the leveldb-style log that follows the 7-byte ':W&B' file header."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing the ':W&B' header)")
    position, pending = 7, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # zero padding at the end of a block
            position += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + _HEADER])
        payload = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""
        else:
            break  # zero-filled tail of a run that was not finished


def read_history(run_dir: str | Path) -> list[dict]:
    """Every ``log`` call of an offline run as a dict of key -> value (in order)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for payload in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
