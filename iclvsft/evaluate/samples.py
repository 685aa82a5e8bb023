"""samples.jsonl: one row per item x cell, appended chunk by chunk; an interrupted append is cut off
on the next read, so a resumed run ends with the same file as an uninterrupted one."""
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
