"""The dataset directory's lists: `manifest.jsonl` (usable videos) and `rejected.jsonl`.

Both are append-only JSON-lines files written by one process. Each line is written with a
single write() and fsync'd, so an interrupted run leaves at most one partial last line, which
`read_jsonl(..., repair=True)` cuts off.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError

MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"


def read_jsonl(path: str | os.PathLike, repair: bool = False,
               torn: list | None = None) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (interrupted write) is dropped (said in
    `torn`, where given), and with `repair` also cut from the file. A bad line elsewhere is a
    ConfigError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1  # bytes after the last newline are a torn write
    records = []
    for i, line in enumerate(raw[:good_end].split(b"\n")[:-1]):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ConfigError(f"{path}: line {i + 1} is not valid JSON; the file is damaged: "
                              f"restore it or prepare into a new folder") from None
    if good_end < len(raw) and torn is not None:
        torn.append(f"{path}: its last line is torn (an interrupted write) and is left out; "
                    f"rerun prepare into the folder to finish it")
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return records


class JsonlWriter:
    """Appends one record per line, durably (flush + fsync per record)."""

    def __init__(self, path: str | os.PathLike):
        self.fh = open(path, "ab")

    def write(self, record: dict) -> None:
        self.fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()
