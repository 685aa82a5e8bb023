"""Model anatomy and hooks: where a decoder's heads and MLPs are, and :func:`run_patched`, the one
generic hooked forward pass (patch, record, attach gradient probes) that every method is built on.

Plain PyTorch hooks on the Hugging Face modules: a forward pre-hook on ``self_attn.o_proj`` (its
input, reshaped to ``(heads, head_dim)``, holds every query head's output) and a forward hook on
``mlp``. Any Qwen2/Llama/Mistral-style decoder works; a PEFT-wrapped ``o_proj`` is hooked the same way.
Gemma 3 too (checked on gemma3-270m: head_dim 256 x 4 heads, wider than its hidden 640): its extra
norms after attention and MLP come after the hooked points, so a component is what feeds them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import Prefix, device_of
from ..errors import ConfigError


@dataclass(frozen=True)
class Component:
    """One attention head (``head`` = its query-head index) or the MLP (``head is None``) of a layer."""

    layer: int
    head: int | None = None

    def column(self, n_heads: int) -> int:
        return n_heads if self.head is None else self.head

    def label(self) -> str:
        return f"L{self.layer}.MLP" if self.head is None else f"L{self.layer}.H{self.head}"


@dataclass
class Anatomy:
    """Where the hooked modules of a decoder-only model are, and the grid's shape."""

    layers: list[torch.nn.Module]
    n_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> tuple[int, int]:
        """The map's shape: layers x (heads + MLP)."""
        return (self.n_layers, self.n_heads + 1)

    def components(self) -> list[Component]:
        return [Component(l, h) for l in range(self.n_layers) for h in [*range(self.n_heads), None]]

    def labels(self) -> list[list[str]]:
        return [[Component(l, h).label() for h in [*range(self.n_heads), None]] for l in range(self.n_layers)]


def anatomy(model) -> Anatomy:
    """Find the decoder layers (a ModuleList whose blocks have ``self_attn.o_proj`` and ``mlp``)."""
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(
                hasattr(b, "self_attn") and hasattr(b.self_attn, "o_proj") and hasattr(b, "mlp") for b in module):
            layers = list(module)
            break
    else:
        raise ConfigError(f"{type(model).__name__}: no decoder layers with self_attn.o_proj and mlp found; "
                          "circuit analysis supports Qwen2/Llama/Mistral/Gemma-3-style models")
    config = model.config
    n_heads = int(config.num_attention_heads)
    o_proj = layers[0].self_attn.o_proj
    in_features = getattr(o_proj, "in_features", None) or o_proj.weight.shape[1]
    head_dim = getattr(config, "head_dim", None) or in_features // n_heads
    if n_heads * head_dim != in_features:
        raise ConfigError(f"o_proj takes {in_features} features, not heads x head_dim = {n_heads} x {head_dim}")
    return Anatomy(layers, n_heads, int(head_dim))


@dataclass
class Trace:
    """What one hooked forward pass returns: the last position's logits and, on request, the
    components' activations (``attn[l]``: [B, T, H, D]; ``mlp[l]``: [B, T, d_model]) and the zero
    tensors added to them for gradients (same keys and shapes)."""

    logits: torch.Tensor  # [B, V], float32
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_delta: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_delta: dict[int, torch.Tensor] = field(default_factory=dict)


class ComponentHooks:
    """Forward hooks that patch, record and attach gradient probes to every component (a context
    manager: the hooks are removed on exit)."""

    def __init__(self, anat: Anatomy, patches: Sequence[Mapping[Component, torch.Tensor]], capture: bool,
                 attach_grad: bool, trace: Trace):
        self.anat, self.capture, self.attach_grad, self.trace = anat, capture, attach_grad, trace
        self.attn_patches: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        self.mlp_patches: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for row, mapping in enumerate(patches):
            for comp, value in mapping.items():
                if comp.head is None:
                    self.mlp_patches.setdefault(comp.layer, []).append((row, value))
                else:
                    self.attn_patches.setdefault(comp.layer, []).append((row, comp.head, value))
        self.handles: list[Any] = []

    def __enter__(self) -> ComponentHooks:
        for l, block in enumerate(self.anat.layers):
            self.handles.append(block.self_attn.o_proj.register_forward_pre_hook(self._attn_hook(l)))
            self.handles.append(block.mlp.register_forward_hook(self._mlp_hook(l)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _finish(self, x: torch.Tensor, store: dict, delta_store: dict, l: int) -> torch.Tensor:
        if self.capture:
            store[l] = x.detach()
        if self.attach_grad:
            delta = torch.zeros_like(x, requires_grad=True)
            delta_store[l] = delta
            x = x + delta
        return x

    def _attn_hook(self, l: int) -> Callable:
        def hook(module, args):
            x = args[0]
            b, t, _ = x.shape
            heads = x.reshape(b, t, self.anat.n_heads, self.anat.head_dim)
            if l in self.attn_patches:
                heads = heads.clone()
                for row, head, value in self.attn_patches[l]:
                    heads[row, :, head, :] = value.to(heads.dtype)
            heads = self._finish(heads, self.trace.attn, self.trace.attn_delta, l)
            return (heads.reshape(b, t, -1), *args[1:])
        return hook

    def _mlp_hook(self, l: int) -> Callable:
        def hook(module, args, output):
            x = output
            if l in self.mlp_patches:
                x = x.clone()
                for row, value in self.mlp_patches[l]:
                    x[row] = value.to(x.dtype)
            return self._finish(x, self.trace.mlp, self.trace.mlp_delta, l)
        return hook


def run_patched(model, anat: Anatomy, prefix: Prefix, rows: Sequence[Sequence[int]], *,
                patches: Sequence[Mapping[Component, torch.Tensor]] | None = None, capture: bool = False,
                attach_grad: bool = False) -> Trace:
    """The one generic routine: run ``prefix + row`` for each row (a batch; rows of equal length T),
    row ``i`` with the components in ``patches[i]`` replaced by the given activations (head:
    [T, head_dim], MLP: [T, d_model]) at every position; optionally record every component's
    activation and attach zero tensors for gradients.

    ``prefix`` is the shared, cached part of the prompts (:func:`iclvsft.engine.build_prefix`); its
    KV cache is copied for the batch. Gradients flow only when called under ``torch.enable_grad()``
    with ``attach_grad``.
    """
    patches = list(patches) if patches is not None else [{}] * len(rows)
    if len(patches) != len(rows) or len({len(r) for r in rows}) != 1:
        raise ValueError("run_patched: one patch mapping per row, and rows of equal length")
    batch, t = len(rows), len(rows[0])
    device = device_of(model)
    x = torch.tensor([list(r) for r in rows], device=device)
    p = prefix.length
    mask = torch.ones((batch, p + t), dtype=torch.long, device=device)
    positions = torch.arange(p, p + t, device=device).expand(batch, -1)
    cache = prefix.expanded(batch) if p else None
    trace = Trace(logits=None)
    with ComponentHooks(anat, patches, capture, attach_grad, trace):
        out = model(input_ids=x, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=cache is not None, logits_to_keep=1)
    trace.logits = out.logits[:, -1, :].float()
    return trace


@contextlib.contextmanager
def weights_frozen(model) -> Iterator[None]:
    """No gradients for the weights during attribution (only the activations' are needed)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
