"""File IO shared by every script: atomic writes, JSONL, hashes and run provenance."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Hashable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .errors import DataError

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "gguf")


class _Lines:
    """A stream for tqdm outside a terminal: its carriage returns dropped, so a log file gets plain lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "")
        if text:
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def shows_bars(show_progress: bool = True) -> bool:
    """Whether progress bars are shown: only when asked (no ``--quiet``) and stderr is a terminal. Our
    own bars (:func:`progress`) turn into plain lines elsewhere; library bars are then off altogether
    (:func:`library_bars`)."""
    return bool(show_progress) and sys.stderr.isatty()


# transformers' GGUF converter draws its own tqdm (``tqdm.auto.tqdm``, bound in that module), which
# transformers.utils.logging.disable_progress_bar does not reach.
_GGUF_MODULE = "transformers.modeling_gguf_pytorch_utils"


@contextlib.contextmanager
def library_bars(show_progress: bool = True):
    """Library progress bars inside the block follow :func:`shows_bars`: transformers' own bars (loading
    weights) and the bar of its GGUF converter ("Converting and de-quantizing GGUF tensors...") are
    switched off unless bars are shown; the previous state is restored on leaving."""
    if shows_bars(show_progress):
        yield
        return
    with contextlib.ExitStack() as restore:
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.callback(hf_logging.enable_progress_bar)
        with contextlib.suppress(ImportError):
            module = importlib.import_module(_GGUF_MODULE)
            bar = getattr(module, "tqdm", None)
            if bar is not None:
                def silent(*args, **kwargs):
                    return bar(*args, **{**kwargs, "disable": True})

                module.tqdm = silent
                restore.callback(setattr, module, "tqdm", bar)
        yield


def progress(*args, nested: bool = False, **kwargs):
    """A tqdm progress bar that suits where stderr goes. On a terminal: tqdm as usual. Elsewhere (a log
    file, CI): a plain line (no carriage return) per update at most every 30 s, and no nested bars
    (their cursor moves leave escape codes in files)."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        if nested:
            kwargs["disable"] = True
        kwargs.setdefault("mininterval", 30)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("bar_format", "{l_bar}{bar:20}{r_bar}\n")
        kwargs.setdefault("file", _Lines(sys.stderr))
    return tqdm(*args, **kwargs)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half of one.
    A file that already holds exactly ``data`` is left alone (a finished run in a read-only folder
    can be read again without rewriting its metrics)."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read from /proc without changing it (``os.umask`` can only be read by setting
    it, which races with threads creating files); elsewhere read by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_readable(path: str | Path) -> None:
    """Give ``path`` the permissions the umask allows: ``0666 & ~umask`` for a file; for a folder
    ``0777 & ~umask`` and the files directly inside it ``0666 & ~umask`` (mkstemp and the safetensors
    writer create files as 0600)."""
    path = Path(path)
    umask = current_umask()
    if not path.is_dir():
        path.chmod(0o666 & ~umask)
        return
    path.chmod(0o777 & ~umask)
    for child in path.iterdir():
        if child.is_file():
            child.chmod(0o666 & ~umask)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Stable, human-readable JSON (sorted keys, so equal content gives equal bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def jsonl_line(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(jsonl_line(r) for r in rows))


def read_json(path: Path) -> dict:
    """A JSON file's content, or {} when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def read_jsonl(path: str | Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, row)``; a missing file or a corrupt line raises DataError with ``hint``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}" + (f"; {hint}" if hint else ""))
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text" + (f"; {hint}" if hint else "")) from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: corrupt JSON line ({e.msg})" + (f"; {hint}" if hint else "")) from None


def slug(text: str) -> str:
    """A folder-safe name for a model name, hub id or path (the last 80 characters)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text).strip("/")).strip("_")[-80:]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- content digests, cached by (path, size, mtime) -------------------------------------------------
# A run's identity names the weights it used by content (an adapter retrained in place under the
# same path is another run). Hashing a 2.5 GB folder takes seconds, so each file's sha256 is kept in
# a small JSON cache keyed by its path, size and modification time, and recomputed when they change.

_DIGESTS: dict[str, str] = {}


def _digest_cache_path() -> Path:
    root = os.environ.get("ICLVSFT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                            os.path.expanduser("~/.cache"), "iclvsft")
    return Path(root) / "file_sha256.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, from the cache while its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key in _DIGESTS:
        return _DIGESTS[key]
    cache_path = _digest_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = cache.get(key) if isinstance(cache, dict) else None
    if not isinstance(digest, str):
        digest = sha256_file(path)
        cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items() if not k.startswith(f"{path}|")}
        cache[key] = digest
        with contextlib.suppress(OSError):  # a read-only cache only costs a recomputation next time
            atomic_write_text(cache_path, json.dumps(cache, sort_keys=True))
    _DIGESTS[key] = digest
    return digest


# What a model or adapter folder's results depend on: the weights, the configs, generation_config.json
# (eos ids, the pad token) and the tokenizer with its chat template (a tokenizer edited in place gives
# other tokens, or another prompt in chat style, from the same weights).
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json", "adapter_config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "merges.txt", "tokenizer.model", "chat_template*")


def folder_sha256(folder: str | Path, patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """One sha256 over the files of ``folder`` (top level) matching ``patterns``: their names and contents."""
    folder = Path(folder)
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def host_ram_bytes() -> float:
    """Total physical memory (``os.sysconf``): other processes' use is not subtracted; 0 where unknown."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return 0.0


def git_commit(repo: str | Path | None = None) -> str | None:
    """The current commit of the repo (``+dirty`` when tracked files changed), or None outside git."""
    repo = Path(repo or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def package_version(name: str) -> str | None:
    """The installed version of the distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """The Python version and each package's installed version (None when absent)."""
    return {"python": platform.python_version(), **{name: package_version(name) for name in names}}


def provenance() -> dict[str, Any]:
    """What every result file records besides its config: code version, commit, packages, platform.
    (The command line is recorded separately where useful: it differs between equal runs.)"""
    from . import __version__

    return {"iclvsft": __version__, "git_commit": git_commit(), "versions": package_versions(),
            "platform": platform.platform()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a repeated key. Hand-written because PyYAML keeps the
    last value silently and has no option to refuse (a config with ``lr`` twice would run with one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    line = key_node.start_mark.line + 1  # in the message itself: one line, no source excerpt
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice (line {line})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (a ``yaml.YAMLError`` naming the key and its line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
