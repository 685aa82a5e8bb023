"""The project's error types: each carries what went wrong and what to do about it.

What to do is data: keys of :data:`REMEDIES`, worded for the command that reports the error. The code
that raises names only the key (``"another_out"``); ``reproduce.py``, whose folder flag is ``--results``
and which can start the whole study over, words the same keys its own way (``iclvsft.commands``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# Each remedy's default wording: finetune.py's and test.py's flags.
REMEDIES = {
    "choose_folder": "choose a folder",
    "another_out": "choose another --out",
    "move_folder": "move that folder away",
    "overwrite_train": "pass --overwrite to train it again",
    "resume": "rerun with the same settings to resume it",
    "overwrite_start": "pass --overwrite to start over",
    "another_results": "use another results folder",
    "move_run": "move that run away to train it again",
    "another_data": "pass another --data folder",
    "wait_writer": "wait for that run to end",
}


class IclvsftError(Exception):
    """Base class; scripts print the message and exit with status 2 instead of a traceback.

    ``what``: what went wrong; ``remedies``: keys of :data:`REMEDIES`, printed after it (joined by
    ", or "); ``out``: the folder the message is about, printed first as the flag that named it
    (``flag PATH``; an ``--out`` folder may be named another way by the command, see :meth:`render`).
    A plain message (no remedies, no ``out``) is printed as it is."""

    def __init__(self, what: str, *remedies: str, out: str | Path | None = None, flag: str = "--out"):
        unknown = [r for r in remedies if r not in REMEDIES]
        if unknown:
            raise ValueError(f"unknown remedies {unknown}; add them to iclvsft.errors.REMEDIES")
        self.what, self.remedies, self.out, self.flag = what, tuple(remedies), out, flag
        super().__init__(self.render())

    def render(self, words: Mapping[str, str] | None = None, out_flag: str = "--out") -> str:
        """The message with each remedy in ``words`` (else :data:`REMEDIES`) and ``out`` named by its flag;
        an ``--out`` folder under a command whose folder is ``out_flag``: ``PATH (under OUT_FLAG)``."""
        text = self.what
        if self.out is not None:
            renamed = self.flag == "--out" and out_flag != "--out"
            subject = f"{self.out} (under {out_flag})" if renamed else f"{self.flag} {self.out}"
            text = f"{subject} {text}"
        if self.remedies:
            text += "; " + ", or ".join((words or {}).get(r, REMEDIES[r]) for r in self.remedies)
        return text

    def reword(self, words: Mapping[str, str], out_flag: str = "--out") -> None:
        """Print this error with a command's wording of its remedies and flags."""
        self.args = (self.render(words, out_flag),)


class ConfigError(IclvsftError):
    """A bad config key or value, an unknown task or model name."""


class DataError(IclvsftError):
    """A missing or corrupt data file, or a generated item that fails its own checks."""
