"""Patching: thin wrappers around :func:`~iclvsft.circuits.hooks.run_patched` that turn one clean /
corrupted pair into per-component effects (logit units, grid ``anat.shape``). Patching only: no
statistics, plots or files."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import CIRCUIT_METHODS as METHODS
from ..engine import Prefix
from ..errors import ConfigError
from .hooks import Anatomy, Component, Trace, run_patched, weights_frozen
from .pairs import PairInputs


@dataclass
class PatchResult:
    """One pair in one condition: the metric on both runs and the maps (``anat.shape``, logit units)."""

    m_clean: float
    m_corrupt: float
    attribution: np.ndarray | None = None
    activation: np.ndarray | None = None


def capture(model, anat: Anatomy, prefix: Prefix, *rows: Sequence[int]) -> Trace:
    """Activations of every component on ``prefix + row`` for each row (one batch)."""
    with torch.no_grad():
        return run_patched(model, anat, prefix, rows, capture=True)


def component_activation(trace: Trace, comp: Component, row: int = 0) -> torch.Tensor:
    """A component's recorded activation: [T, head_dim] for a head, [T, d_model] for the MLP."""
    return trace.mlp[comp.layer][row] if comp.head is None else trace.attn[comp.layer][row, :, comp.head, :]


def attribution_patching(model, anat: Anatomy, inputs: PairInputs) -> PatchResult:
    """Gradient x (clean - corrupted activation), summed over positions and dims, for every component.

    Clean and corrupted prompts run as one batch of two (row 0 clean, row 1 corrupted); the gradient
    of the corrupted row's metric does not reach the clean row, so this is the clean forward plus the
    corrupted forward and backward, in one pass each way.
    """
    with torch.enable_grad(), weights_frozen(model):
        trace = run_patched(model, anat, inputs.prefix, [inputs.clean_ids, inputs.corrupt_ids], capture=True,
                            attach_grad=True)
        metrics = inputs.metric(trace.logits)
        layers = range(anat.n_layers)
        grads = torch.autograd.grad(metrics[1], [trace.attn_delta[l] for l in layers]
                                    + [trace.mlp_delta[l] for l in layers])
    out = np.zeros(anat.shape)
    for l in layers:
        g_attn, g_mlp = grads[l][1].float(), grads[anat.n_layers + l][1].float()  # [T, H, D], [T, d]
        d_attn = trace.attn[l][0].float() - trace.attn[l][1].float()
        d_mlp = trace.mlp[l][0].float() - trace.mlp[l][1].float()
        out[l, :anat.n_heads] = (g_attn * d_attn).sum(dim=(0, 2)).cpu().numpy()
        out[l, anat.n_heads] = float((g_mlp * d_mlp).sum())
    m_clean, m_corrupt = metrics.detach().tolist()
    return PatchResult(m_clean, m_corrupt, attribution=out)


@torch.no_grad()
def activation_patching(model, anat: Anatomy, inputs: PairInputs, batch_size: int = 32,
                        components: Sequence[Component] | None = None) -> PatchResult:
    """Exact denoising patching: the corrupted run with one component set to its clean activation;
    effect = m_patched - m_corrupt, for every component (or those given), ``batch_size`` patched
    copies per forward pass."""
    base = capture(model, anat, inputs.prefix, inputs.clean_ids, inputs.corrupt_ids)
    m_clean, m_corrupt = inputs.metric(base.logits).tolist()
    comps = list(components) if components is not None else anat.components()
    out = np.full(anat.shape, np.nan)
    for start in range(0, len(comps), max(1, batch_size)):
        chunk = comps[start:start + batch_size]
        patches = [{c: component_activation(base, c, row=0)} for c in chunk]
        patched = run_patched(model, anat, inputs.prefix, [inputs.corrupt_ids] * len(chunk), patches=patches)
        for c, m in zip(chunk, inputs.metric(patched.logits).tolist()):
            out[c.layer, c.column(anat.n_heads)] = m - m_corrupt
    return PatchResult(m_clean, m_corrupt, activation=out)


def patch_pair(model, anat: Anatomy, inputs: PairInputs, method: str, batch_size: int = 32) -> PatchResult:
    """``method``: attribution, activation or both."""
    if method not in METHODS:
        raise ConfigError(f"circuits.method must be one of {', '.join(METHODS)}, got {method!r}")
    result = attribution_patching(model, anat, inputs) if method in ("attribution", "both") else None
    if method in ("activation", "both"):
        exact = activation_patching(model, anat, inputs, batch_size)
        if result is None:
            return exact
        result.activation = exact.activation
    return result
