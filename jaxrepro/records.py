"""JSON-lines run records: read (tolerating a torn last line), rewrite, append.

A run killed mid-write can leave half a line at the end of a record file; readers
stop there, and a resumed run rewrites the file up to its checkpoint's step.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file, up to the first line that does not parse."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a JSON-lines file atomically (write aside, then rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    tmp.replace(path)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record and flush it, so a kill loses at most this line."""
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
