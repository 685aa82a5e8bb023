"""samples.jsonl: one row per item x cell, appended chunk by chunk; an interrupted append is cut off
on the next read, so a resumed run ends with the same file as an uninterrupted one."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..io import jsonl_line

log = logging.getLogger(__name__)


def read_samples(path: Path) -> list[dict]:
    """Rows of samples.jsonl; a half-written last line (an interrupted append) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("%s: dropping a half-written last line (interrupted run)", path)
        with path.open("r+b") as f:
            f.truncate(keep)
    rows = []
    for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: corrupt line; move the folder away and rerun") from None
    return rows


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(jsonl_line(r) for r in rows))
        f.flush()
        os.fsync(f.fileno())
