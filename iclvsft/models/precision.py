"""Device, parameter dtype and attention kernel: the explicit names checked, ``auto`` resolved for this machine."""
from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from ..errors import ConfigError
from .offline import OFFLINE_MODELS
from .tiny import is_tiny_model

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
    exactly); on CUDA bf16 when supported, else fp16; on CPU bf16 when the CPU has native bf16
    (:func:`cpu_has_native_bf16`), else fp32; fp32 on MPS.
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
    # An offline name always means the offline model (load_model resolves it before any folder).
    if tiny or (name not in OFFLINE_MODELS and is_tiny_model(name)):
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On a CPU with native bf16, bf16 runs 1.6-2x faster than fp32.
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken build raising anything at import
        return False
    return True


HALF_DTYPES = (torch.bfloat16, torch.float16)


def resolve_attn_implementation(attn_implementation: str = "auto", device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32, *,
                                autocast_dtype: torch.dtype | None = None) -> str | None:
    """The ``attn_implementation`` passed to transformers.

    ``dtype`` is the weights' dtype; ``autocast_dtype`` the dtype autocast computes in when the run
    uses autocast (full fine-tuning: fp32 master weights under bf16/fp16 autocast). FlashAttention-2
    needs half-precision q/k/v: they are half when the weights are, or when autocast runs in half
    precision (transformers' ``flash_attention_forward`` casts fp32 q/k/v to the autocast dtype,
    ``integrations.flash_attention.get_target_dtype``), so either one being bf16/fp16 is enough.

    ``auto``: ``flash_attention_2`` on CUDA with half-precision attention inputs when ``flash_attn`` is
    importable; otherwise ``None``, which lets transformers pick SDPA (or eager for a model without
    SDPA support). The implementation actually used is read back from the model and recorded in
    ``LoadedModel.info``.
    """
    compute = autocast_dtype if autocast_dtype in HALF_DTYPES else dtype
    if attn_implementation in (None, "auto"):
        device = torch.device(device)
        if device.type == "cuda" and compute in HALF_DTYPES and flash_attn_available():
            return "flash_attention_2"
        return None
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation {attn_implementation!r} is not one of "
                          f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation == "flash_attention_2":
        if torch.device(device).type != "cuda":
            raise ConfigError("attn_implementation flash_attention_2 needs a CUDA device; use sdpa or auto")
        if compute not in HALF_DTYPES:
            raise ConfigError("attn_implementation flash_attention_2 needs dtype bf16 or fp16 (half-precision "
                              "weights, or half-precision autocast over fp32 weights); use sdpa or auto for fp32")
        if not flash_attn_available():
            raise ConfigError("attn_implementation flash_attention_2 needs the flash_attn package "
                              "(pip install flash-attn --no-build-isolation); or use sdpa / auto")
    return attn_implementation


def release_memory() -> bool:
    """Give the memory of models no longer referenced back to the system: ``gc.collect()`` (the
    Trainer and peft keep reference cycles) and glibc's ``malloc_trim(0)``, without which freed
    weights stay in the process (measured: loading and releasing the 1.5B model three times left
    3.0 GB resident, 0.5 GB with the trim). A study that loads model after model otherwise grows
    toward the sum of their sizes. Returns whether the trim ran (glibc only)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process so far: CUDA's allocator peak on a GPU, else the peak resident set
    (which includes the loaded model, the optimizer state and everything before)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
