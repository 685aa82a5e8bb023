"""Model shapes: a decoder-only transformer's dimensions, read from a config.json without loading the
model (the tiny test model, an offline model's cache, a folder, the local hub cache) or known by name."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30

#: Saved activations per token and decoder layer, in bytes, as (a, b): a x hidden + b x intermediate.
#: Measured with torch.autograd.graph.saved_tensors_hooks on Qwen2.5-0.5B-shaped layers (hidden 896,
#: 14/2 heads, intermediate 1792 and 4864: two points fit a and b) under bf16 autocast, SDPA, one
#: forward pass, as the Trainer runs them; tests/test_plan.py measures them again on another shape.
ACT_FULL = (36.0, 8.0)  # full FT over fp32 weights: each matmul saves its own bf16 cast of its input
ACT_LORA = (43.0, 12.0)  # LoRA: bf16 base + the adapter branches (dropout masks, their inputs)
ACT_FP32_FACTOR = 2.0  # no half-precision compute: saved tensors are 4 bytes instead of 2 (an upper bound)


@dataclass(frozen=True)
class Shape:
    """What memory and time depend on: a decoder-only transformer's dimensions."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama-style models do not
    source: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embedding = self.vocab * self.hidden
        return embedding * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters used in matrix products: all but an untied input embedding (a lookup)."""
        return self.params - (0 if self.tied else self.vocab * self.hidden)

    @property
    def largest_tensor(self) -> int:
        """Values of the largest weight: the embedding (or output head), an MLP or the query projection."""
        return self.hidden * max(self.vocab, self.intermediate, self.heads * self.hd)

    def largest_lora_tensor(self, r: int) -> int:
        return r * max(self.hidden, self.heads * self.hd, self.intermediate)

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank ``r`` on every linear layer but the output head (all-linear)."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_dim, self.intermediate
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return self.layers * r * per_layer

    def activation_bytes(self, tokens: float, lora: bool, half: bool, checkpointing: bool = False) -> float:
        a, b = ACT_LORA if lora else ACT_FULL
        per_layer = (a * self.hidden + b * self.intermediate) * (1.0 if half else ACT_FP32_FACTOR)
        if checkpointing:  # each layer's input kept (fp32 residual), one layer's activations recomputed at a time
            return tokens * (self.layers * 4 * self.hidden + per_layer)
        return tokens * self.layers * per_layer

    def kv_bytes_per_token(self, nbytes: int) -> int:
        return 2 * self.layers * self.kv_dim * nbytes


#: What a config.json may leave out because transformers' config class has it as default: a multimodal
#: Gemma 3 release (gemma3, e.g. gemma-3-4b) nests a partial ``text_config`` (Gemma3TextConfig's defaults).
CONFIG_DEFAULTS: dict[str, dict] = {
    "gemma3_text": {"hidden_size": 2304, "num_hidden_layers": 26, "intermediate_size": 9216,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208},
}


def shape_from_config(cfg: dict, source: str = "") -> Shape:
    """A :class:`Shape` from a transformers ``config.json`` (as a dict); a multimodal config's
    ``text_config`` holds the decoder's."""
    text = cfg.get("text_config") or cfg
    text = {**CONFIG_DEFAULTS.get(str(text.get("model_type", "")), {}), **text}
    heads = int(text["num_attention_heads"])
    model_type = str(text.get("model_type", ""))
    return Shape(hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
                 intermediate=int(text["intermediate_size"]), heads=heads,
                 kv_heads=int(text.get("num_key_value_heads") or heads), vocab=int(text["vocab_size"]),
                 tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
                 head_dim=int(text.get("head_dim") or 0),
                 qkv_bias=model_type.startswith("qwen2") or bool(text.get("attention_bias", False)), source=source)


QWEN25 = "the public Qwen2.5 config"
#: The architectures of the public configs, for models not on this machine (no hub is contacted).
KNOWN_SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape(896, 24, 4864, 14, 2, 151936, True, source=QWEN25),
    "qwen2.5-1.5b": Shape(1536, 28, 8960, 12, 2, 151936, True, source=QWEN25),
    "qwen2.5-3b": Shape(2048, 36, 11008, 16, 2, 151936, True, source=QWEN25),
    "qwen2.5-7b": Shape(3584, 28, 18944, 28, 4, 152064, False, source=QWEN25),
    "qwen2.5-14b": Shape(5120, 48, 13824, 40, 8, 152064, False, source=QWEN25),
    "qwen2.5-32b": Shape(5120, 64, 27648, 40, 8, 152064, False, source=QWEN25),
    # the offline GGUF of Qwen2.5-Coder-0.5B-Instruct carries an untied output layer (~630M parameters)
    "qwen2.5-coder-0.5b-instruct": Shape(896, 24, 4864, 14, 2, 151936, False, source="the offline GGUF"),
    # and that of the 1.5B model (~1.78B parameters, not the upstream 1.54B): before it is prepared, the plan
    # must not fall back to the tied upstream shape and underestimate full FT by ~3.5 GiB
    "qwen2.5-coder-1.5b-instruct": Shape(1536, 28, 8960, 12, 2, 151936, False, source="the offline GGUF"),
    "smollm2-135m-instruct": Shape(576, 30, 1536, 9, 3, 49152, True, qkv_bias=False, source="the public config"),
    # 4 query heads of 256 (wider than hidden 640), q/k norms and 4 norms a layer (0.01% of its parameters, not counted)
    "gemma3-270m": Shape(640, 18, 2048, 4, 1, 262144, True, head_dim=256, qkv_bias=False, source="the public config"),
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_shape(name: str) -> Shape | None:
    """The shape of model ``name`` without loading it: the tiny test model's config, an offline model's
    cached config.json, a local folder's config.json (an adapter folder: its base model's), the local
    hub cache's config.json, else :data:`KNOWN_SHAPES` by name; None when unknown."""
    # iclvsft.models imports torch: only when a shape is looked up, so a config checks without it
    from ..models.offline import OFFLINE_MODELS, model_cache_root
    from ..models.tiny import TINY_MODEL_NAME

    if name == TINY_MODEL_NAME:
        from ..models.tiny import tiny_config

        return shape_from_config(tiny_config().to_dict(), "the tiny model's config")
    lower = name.lower()
    if name in OFFLINE_MODELS:
        cfg = _read_json(model_cache_root() / name / "config.json")
        if cfg:
            return shape_from_config(cfg, "the cached config.json")
        return KNOWN_SHAPES.get(lower) or _known_by_name(lower)
    folder = Path(name).expanduser()
    if folder.is_dir():
        cfg = _read_json(folder / "config.json")
        if cfg:
            return shape_from_config(cfg, f"{folder}/config.json")
        from ..models.offline import adapter_base

        base = adapter_base(folder)
        return model_shape(base) if base and base != name else None
    try:  # the local hub cache only: never the network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub library refuses, or no cache
        cached = None
    if isinstance(cached, str):
        cfg = _read_json(Path(cached))
        if cfg:
            return shape_from_config(cfg, "the local hub cache")
    return KNOWN_SHAPES.get(lower) or _known_by_name(lower)


def _known_by_name(lower: str) -> Shape | None:
    match = re.search(r"qwen2\.5-(?:coder-|math-)?(\d+(?:\.\d+)?)b", lower)
    if match:
        return KNOWN_SHAPES.get(f"qwen2.5-{match.group(1)}b")
    match = re.search(r"gemma-?3-(\d+[mb])", lower)  # google/gemma-3-270m(-it), gemma3-270m
    return KNOWN_SHAPES.get(f"gemma3-{match.group(1)}") if match else None


