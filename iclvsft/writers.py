"""One writer per results folder: a lock file inside the folder (:data:`LOCK_FILE`, ``filelock``), held
for the whole run by every writer: test.py (:func:`iclvsft.evaluate.evaluate`), finetune.py
(:func:`iclvsft.train.finetune`), reproduce.py (:func:`iclvsft.study.run_study`) and
analyze_circuits.py (:func:`iclvsft.circuits.analyze`). A second process that would write the same
folder is refused at once with one line; it never waits.

The lock is re-entrant within a process: the command takes it before clearing a folder for
--overwrite and the library call it makes holds it again; the study holds its results folder while
its stages lock their own folders under it. Under ``accelerate launch`` only the main process takes
it and tells the others whether it got it, so a refusal stops every process and none waits on a
barrier the main process never reaches.

A folder the lock created and the run then left empty (a run refused before writing anything) is
removed again, with any parent folders it created: a refused run leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"

_HELD: dict[str, int] = {}  # folders this process holds (real path -> depth)


def check_folder(folder: str | Path, flag: str = "--out") -> None:
    """A folder option (``--out``, ``--results``, ``--data``) must not name an existing file: one line,
    before anything is created."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError("is a file", "choose_folder", out=path, flag=flag)


def clear_folder(folder: str | Path) -> None:
    """Delete everything in ``folder`` but its lock file (--overwrite: deleting the folder itself would
    drop the lock while this process holds it)."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def entries(folder: str | Path) -> list[Path]:
    """What ``folder`` holds besides its lock file."""
    return [p for p in Path(folder).iterdir() if p.name != LOCK_FILE]


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _acquire(folder: Path) -> FileLock | None:
    """Create ``folder`` and take its lock without waiting; None when the folder is read-only to this
    process (it can then write nothing there either: a finished run is read again)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"is being written by another process (it holds {folder / LOCK_FILE})", "wait_writer",
                          "another_out", out=folder) from None
    except PermissionError:
        if os.access(folder, os.W_OK):
            raise ConfigError(f"cannot take the writer lock {folder / LOCK_FILE} (permission denied)",
                              "another_out", out=folder) from None
        log.debug("%s is read-only to this process: reading it without the writer lock", folder)
        return None
    return lock


def _shared(error: BaseException | None, state: Any) -> BaseException | None:
    """The main process's outcome, on every process of an ``accelerate launch``."""
    if state is None or state.num_processes <= 1:
        return error
    from accelerate.utils import broadcast_object_list

    message = [str(error) if error is not None else None]
    broadcast_object_list(message, from_process=0)
    if state.is_main_process or message[0] is None:
        return error
    return ConfigError(message[0])


@contextmanager
def writing(folder: str | Path, state: Any = None) -> Iterator[None]:
    """Hold ``folder``'s writer lock for the block (re-entrant in this process). ``state``: the
    ``accelerate`` ``PartialState`` of a multi-process run (only its main process locks), None for one
    process. Raises :class:`ConfigError` when ``folder`` is a file or another process holds the lock."""
    folder = Path(folder)
    check_folder(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    main = state is None or state.is_main_process
    created = _missing_parents(folder) if main else []
    lock, error = None, None
    if main:
        try:
            lock = _acquire(folder)
        except Exception as e:  # told to the other processes before it is raised here
            error = e
    error = _shared(error, state)
    if error is not None:
        raise error
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        if lock is not None:
            _remove_if_unused(created)
            lock.release()


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the folders the lock created when the run wrote nothing there (the lock file goes while
    it is still held, so no other process can take a lock on a file about to vanish unnoticed)."""
    if not created or entries(created[0]):
        return
    (created[0] / LOCK_FILE).unlink(missing_ok=True)
    for path in created:
        try:
            path.rmdir()
        except OSError:  # not empty (another run made something there meanwhile) or already gone
            break


__all__ = ["LOCK_FILE", "check_folder", "clear_folder", "entries", "writing"]
