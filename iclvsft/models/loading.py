"""``load_model``: a model name -> a model in eval mode, its tokenizer and a record of every choice made.

Names are the tiny test model, an offline name, a local model or PEFT adapter folder, or a Hugging Face
hub id (see :func:`load_model`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from ..errors import ConfigError
from ..io import folder_sha256, library_bars
from .offline import OFFLINE_MODELS, adapter_base, ensure_offline_model, read_marker
from .params import count_parameters
from .precision import resolve_attn_implementation, resolve_device, resolve_dtype
from .tiny import TINY_MODEL_NAME, build_tiny_model, build_tiny_tokenizer


@contextlib.contextmanager
def quiet_peft_deprecation():
    """peft asks every model ``getattr(model, "is_gradient_checkpointing", True)``, which transformers 5
    answers with a FutureWarning (the attribute is deprecated): on every adapter made or loaded, about
    code that is not ours. Silenced around exactly those calls (a module-level filter would be lost to
    any caller that resets the warning filters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer (pad token set, left padding) and what was chosen (``info``)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def offline_model_names() -> list[str]:
    """The names :func:`load_model` resolves without a hub: :data:`OFFLINE_MODELS` and ``tiny-random-qwen2``."""
    return [*OFFLINE_MODELS, TINY_MODEL_NAME]


# ------------------------------------------------------------------------------------ the hub probe
# When the hub cannot be reached, only the local hub cache is consulted, so a missing model fails in
# seconds instead of after a minute of transformers' retries.

def _hub_endpoint_host() -> tuple[str, int]:
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
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


# ------------------------------------------------------------------------------------------ sources

def _looks_like_path(name: str) -> bool:
    """A name that can only be meant as a folder (a hub id is ``name`` or ``owner/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1 or name.endswith("/"))


def _resolve_source(name: str, cache_dir, show_progress: bool = True) -> tuple[str, str, dict[str, Any]]:
    """(kind, path-or-id, extra info) for a model name; kind is tiny, offline, local, adapter or hub."""
    if name == TINY_MODEL_NAME:
        return "tiny", TINY_MODEL_NAME, {}
    if name in OFFLINE_MODELS:
        folder = ensure_offline_model(name, cache_dir, show_progress=show_progress)
        marker = read_marker(folder) or {}
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


def weights_identity(name: str) -> str | None:
    """What a run's results depend on in the model ``name`` names, by content: the pinned GGUF sha256
    of an offline model (its cache, tokenizer included, is verified against what it was built from on
    load), the sha256 of a local folder's weights, configs, tokenizer files and chat template
    (:data:`iclvsft.io.MODEL_FILES`: a model, adapter or tokenizer saved again in place is another
    model), None for the tiny model (built from code) and hub ids (no content to hash offline)."""
    if name == TINY_MODEL_NAME:
        return None
    if name in OFFLINE_MODELS:
        return f"gguf:{OFFLINE_MODELS[name].sha256}"
    path = Path(name).expanduser()
    return f"files:{folder_sha256(path)}" if path.is_dir() else None


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
        elif not hub_reachable():
            kwargs["local_files_only"] = True
            hub_note = "the Hugging Face hub is unreachable from this machine, so only the local hub cache was searched"
            logger.info("hub unreachable: looking for %s in the local hub cache only", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False,
                                                  local_files_only=kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        if kind != "hub":
            raise ConfigError(f"could not load model folder {source!r} ({type(error).__name__}: {error}); a "
                              "truncated or corrupt weights file: save or train the model again") from error
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


# ----------------------------------------------------------------------- tokenizer, adapter, output

def _prepare_tokenizer(tokenizer, model) -> None:
    """Explicit pad token (eos, or a new ``<|pad|>`` with resized embeddings when there is no eos) and left
    padding, for batched generation."""
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
        with quiet_peft_deprecation():
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
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


# --------------------------------------------------------------------------------------- load_model

def load_model(name: str, *, dtype: str = "auto", device: str = "auto", attn_implementation: str = "auto",
               adapter: str | None = None, merge_adapter: bool = False,
               cache_dir: str | None = None, show_progress: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer by name.

    Names resolve in this order: ``tiny-random-qwen2`` (the test model, built in code); an offline name
    (:data:`OFFLINE_MODELS`, prepared once into the cache by :func:`ensure_offline_model`); a local
    folder holding a saved model (``config.json``) or a PEFT adapter (``adapter_config.json``: its
    recorded base model is loaded by name and the adapter applied); anything else is a hub id
    (``trust_remote_code=False``; only the local hub cache when the hub is unreachable or
    ``HF_HUB_OFFLINE=1``).

    Args:
        name: ``tiny-random-qwen2``, an offline name, a local folder or a hub id.
        dtype: ``auto`` (:func:`resolve_dtype`), ``bf16``, ``fp16``, ``fp32`` or their long names.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        attn_implementation: ``auto`` (:func:`resolve_attn_implementation`), ``eager``, ``sdpa``,
            ``flash_attention_2``.
        adapter: a PEFT adapter folder to apply on top (``PeftModel.from_pretrained``).
        merge_adapter: merge the adapter into the weights (``merge_and_unload``): a plain model, slightly
            faster, no longer a ``PeftModel``.
        cache_dir: where offline models are dequantised (default :func:`model_cache_root`).
        show_progress: library progress bars (transformers' weight loading, the GGUF conversion); shown
            only when stderr is a terminal as well (:func:`iclvsft.io.shows_bars`).

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
    kind, source, extra = _resolve_source(name, cache_dir, show_progress)

    if kind == "adapter":  # a PEFT adapter folder given as the model: load its recorded base model
        if adapter is not None:
            raise ConfigError(f"{name!r} is a PEFT adapter folder and adapter={adapter!r} was also given; "
                              f"pass the base model as the name and one adapter")
        base = adapter_base(source)  # an offline model's upstream id loads the offline copy
        if not base:
            raise ConfigError(f"adapter folder {name!r} does not record its base model; pass the base model "
                              f"as the name and this folder as the adapter")
        loaded = load_model(base, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            adapter=source, merge_adapter=merge_adapter, cache_dir=cache_dir,
                            show_progress=show_progress)
        loaded.info["name"] = name
        return loaded

    torch_dtype = resolve_dtype(dtype, dev, name=source if kind == "local" else name)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    if kind == "tiny":
        model = build_tiny_model(attn).to(device=dev, dtype=torch_dtype)
        tokenizer = build_tiny_tokenizer()
    else:
        with library_bars(show_progress):
            model, tokenizer = _load_pretrained(kind, source, name, torch_dtype, dev, attn)
        if kind == "offline":
            # The name it was loaded by, so a PEFT adapter saved from it records a base model name that
            # load_model understands on any machine.
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
        "n_params": count_parameters(model),
        "model_type": getattr(config, "model_type", None),
        "vocab_size": getattr(config, "vocab_size", None),
        **extra,
        "load_seconds": round(time.perf_counter() - started, 3),
    }
    logger.info("loaded model %s (%s, %s): dtype=%s device=%s attn=%s adapter=%s%s params=%s in %.1fs",
                name, kind, source, info["dtype"], info["device"], info["attn_implementation"], info["adapter"],
                " (merged)" if info["adapter_merged"] else "", f"{info['n_params']:,}", info["load_seconds"])
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
