"""``tiny-random-qwen2``: the test model, a 2-layer Qwen2 with a byte-level tokenizer built in code.

No files, no download, well under a second; every process gets bit-identical fp32 weights whatever the
global RNG state, so tests compare numbers exactly and a subprocess can rebuild the same model by name
(or load a copy written by :func:`save_tiny_model`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_MODEL_NAME = "tiny-random-qwen2"
TINY_SEED = 20241006
TINY_CONFIG_FLAG = "iclvsft_tiny_random"  # set in the tiny model's config, so saved copies also default to fp32
TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
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


def is_tiny_model(name: str) -> bool:
    """Whether ``name`` is ``tiny-random-qwen2`` or a local model folder holding (a descendant of) it:
    a saved copy, or a model fully fine-tuned from it (its config carries :data:`TINY_CONFIG_FLAG`)."""
    if name == TINY_MODEL_NAME:
        return True
    if not name:
        return False
    try:
        return bool(json.loads((Path(name).expanduser() / "config.json").read_text()).get(TINY_CONFIG_FLAG))
    except (OSError, ValueError, AttributeError):
        return False
