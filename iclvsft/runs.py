"""Run folders: the one check that a folder holds the run a caller is about to (re)use or resume.

Every run folder (finetune.py's, test.py's, the study's) records ``{"identity": {...}}`` in a JSON
file. :func:`compare_identity` reads it back and lists what differs from the identity a caller
computed; the callers decide what a difference means (refuse, resume, reuse).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError


def differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """``["key.sub: old -> new", ...]`` for every leaf where the two nested values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if saved == current else [f"{path}: {saved!r} -> {current!r}"]


# Identity keys added after runs were recorded, with the value every run recorded before the key existed
# necessarily had (before prompt_style, every prompt was raw text): a saved identity lacking one reads as
# that value. Content hashes never get a default: a run recorded without one cannot be vouched for.
ADDED_KEYS = {"prompt_style": "raw"}


def read_identity(path: Path, remedies: tuple[str, ...] = ("move_folder",)) -> dict | None:
    """The identity recorded in ``path``; None when there is no such file. An unreadable file raises
    :class:`ConfigError`."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())["identity"]
        if not isinstance(saved, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is unreadable", *remedies) from None
    return {**ADDED_KEYS, **saved}


def compare_identity(path: Path, identity: dict, keys: Iterable[str] | None = None,
                     remedies: tuple[str, ...] = ("move_folder",), per_task: Iterable[str] = ()) -> list[str] | None:
    """What differs between the identity recorded in ``path`` and ``identity`` (only ``keys`` when
    given); None when ``path`` does not exist. ``per_task``: keys whose values map task -> value and
    are compared on the tasks both sides name (a run of other tasks into the folder is the same run
    for the tasks they share). An unreadable file raises :class:`ConfigError`."""
    saved = read_identity(path, remedies)
    if saved is None:
        return None
    current = json.loads(json.dumps(identity, default=str))  # as it would be written
    for key in per_task:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            common = set(old) & set(new)
            saved = {**saved, key: {t: old[t] for t in common}}
            current = {**current, key: {t: new[t] for t in common}}
    if keys is not None:
        keys = list(keys)
        saved = {k: saved.get(k) for k in keys}
        current = {k: current.get(k) for k in keys}
    return differences(saved, current)


def summarise_differences(diff: list[str], limit: int = 5) -> str:
    return "; ".join(diff[:limit]) + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")
