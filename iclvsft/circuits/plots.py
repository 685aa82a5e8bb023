"""Heatmaps of attribution maps: one per condition (mean over items, logits) and one per difference
from base (each map divided by its L1 norm, i.e. what the normalised L1 distance sums)."""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes


def heatmap_figure(values: np.ndarray, title: str, n_heads: int, label: str):
    """The figure of :func:`plot_map` (open; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, float)
    n_layers = values.shape[0]
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    vmax = vmax or 1.0
    # at least 3.2 inches tall: the colour bar's label (along the bar) must fit in the figure when a
    # model has few layers
    fig, ax = plt.subplots(figsize=(2.0 + 0.38 * (n_heads + 1), max(3.2, 1.5 + 0.28 * n_layers)))
    im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.axvline(n_heads - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(range(n_heads + 1), [*(str(h) for h in range(n_heads)), "MLP"], fontsize=7)
    ax.set_yticks(range(n_layers), [str(l) for l in range(n_layers)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label(label, fontsize=8)
    fig.tight_layout()
    return fig


def plot_map(values: np.ndarray, path: str | Path, title: str, n_heads: int, label: str) -> Path:
    """A layers x (heads + MLP) heatmap, diverging colours centred on 0, written atomically as PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(values, title, n_heads, label)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _unit_l1(a: np.ndarray) -> np.ndarray:
    s = np.abs(a).sum()
    return a / s if s > 0 else a


def plot_task(task: str, mean_maps: Mapping[str, np.ndarray], folder: Path, n_heads: int,
              method: str) -> dict[str, str]:
    """Heatmaps per condition (mean map, logits) and per difference from base (L1-normalised maps)."""
    paths = {}
    for cond, m in mean_maps.items():
        paths[cond] = str(plot_map(m, folder / f"{cond}.png", f"{task}: {cond} ({method}), mean over items",
                                   n_heads, "effect on logit diff"))
    for cond in ("icl", "ft"):
        if cond in mean_maps:
            diff = _unit_l1(mean_maps[cond]) - _unit_l1(mean_maps["base"])
            paths[f"{cond}_minus_base"] = str(plot_map(
                diff, folder / f"{cond}_minus_base.png",
                f"{task}: {cond} - base (each map / its L1 norm)", n_heads, "share of |effect|, difference"))
    return paths
