"""samples.jsonl: one row per item x cell, appended chunk by chunk; an interrupted append is cut off
on the next read, so a resumed run ends with the same file as an uninterrupted one. A row is keyed by
(cell, item id): a key already in the file is never appended again, and a file that holds one twice
anyway (written by an older version while two runs shared the folder) is read with the first row only."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..data import load_items
from ..errors import DataError
from ..io import jsonl_line
from ..prompts import build_prompt
from ..tasks import get_task, task_view

log = logging.getLogger(__name__)


def row_key(row: dict) -> tuple[str, str]:
    """What identifies a row: its cell and its item."""
    return row["cell"], row["item_id"]


def read_samples(path: Path) -> list[dict]:
    """Rows of samples.jsonl, one per (cell, item id); a half-written last line (an interrupted append)
    is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("%s: dropping a half-written last line (interrupted run)", path)
        with path.open("r+b") as f:
            f.truncate(keep)
    rows, seen, repeated = [], set(), 0
    for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            key = row_key(row)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: corrupt line; move the folder away and rerun") from None
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        rows.append(row)
    if repeated:
        log.warning("%s: %d repeated (cell, item) rows ignored (the first of each is kept)", path, repeated)
    return rows


def new_rows(rows: Sequence[dict], present: set[tuple[str, str]]) -> list[dict]:
    """The rows whose (cell, item id) is not in ``present`` (the keys already in samples.jsonl) nor
    repeated among ``rows``: what may be appended. ``present`` gains their keys."""
    out = []
    for r in rows:
        if row_key(r) not in present:
            present.add(row_key(r))
            out.append(r)
    return out


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` (filtered by :func:`new_rows`) and sync them to disk."""
    if not rows:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(jsonl_line(r) for r in rows))
        f.flush()
        os.fsync(f.fileno())


def rebuild_prompt(row: dict, data_dir: str | Path, task_params: dict | None = None, tokenizer=None) -> str:
    """The exact prompt a samples.jsonl row was scored with: its task's header in the row's format,
    the demonstrations named by ``demo_ids`` (from the data folder's train pool), then ``question``
    (``prompt_sha256`` of the result equals the row's). A chat-style row needs the model's ``tokenizer``."""
    task = task_view(get_task(row["task"], (task_params or {}).get(row["task"])), row.get("format", "ours"),
                     row.get("prompt_style", "raw"), tokenizer)
    pool = {i.id: i for i in load_items(data_dir, row["task"], "train")}
    missing = [d for d in row["demo_ids"] if d not in pool]
    if missing:
        raise DataError(f"{data_dir}: demonstrations {missing[:3]} are not in the train pool; is this the run's data?")
    return build_prompt(task, row["question"], [task.present(pool[d]) for d in row["demo_ids"]])
