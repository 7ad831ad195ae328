"""Read the records of a W&B offline run file (``run-<id>.wandb``) for tests.

The file is a LevelDB-style log (7-byte file header ``:W&B`` + magic + version, then 32 KiB blocks of
chunks with a 7-byte header: crc32, length, type) holding protobuf ``Record`` messages; this is what
``wandb sync`` uploads. Parsing it checks what W&B really wrote, with W&B's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wait_for_exit_record(path: str | Path, timeout: float = 30.0) -> list[pb.Record]:
    """The records once the run's ``exit`` record is on disk (wandb-core writes the file asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path) if Path(path).exists() else []
        if records and records[-1].WhichOneof("record_type") == "exit" or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history_and_config(path: str | Path) -> tuple[list[dict], dict]:
    """The logged history rows (key -> value) and the merged config of a finished run file."""
    rows, config = [], {}
    for r in wait_for_exit_record(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "config":
            for i in r.config.update:
                config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return rows, config
