"""The report's plots: accuracy vs shots and accuracy vs FT rows (log x), with intervals and the
constant-answer baseline, one PNG per task."""
from __future__ import annotations

from pathlib import Path


def _mean(stat: dict | None) -> float:
    return stat["mean"] if stat and stat.get("mean") == stat.get("mean") else float("nan")


def _yerr(stats: list[dict]) -> list[list[float]]:
    """Error bar lengths (below, above) in % from each stat's 95% interval (0 where it has none)."""
    lo, hi = [], []
    for s in stats:
        a, b = s.get("ci95", [float("nan")] * 2)
        lo.append(max(0.0, 100 * (_mean(s) - a)) if a == a else 0.0)
        hi.append(max(0.0, 100 * (b - _mean(s))) if b == b else 0.0)
    return [lo, hi]


def panels(n: int, width: float = 3.8):
    """A figure of ``n`` panels side by side sharing the y axis (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(width * n, 3.6), sharey=True, squeeze=False)


def save_panels(fig, axes, path: Path, legend_size: int = 7) -> str:
    """Label the first panel's y axis (pattern accuracy), add its legend, write ``path``, close."""
    import matplotlib.pyplot as plt

    axes[0][0].set_ylabel("pattern accuracy (%)")
    axes[0][0].legend(fontsize=legend_size)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _invalid(ax, points: list[tuple[float, dict]], label: str) -> None:
    """The share of invalid answers on pattern items (a faint dotted line): a low accuracy that is mostly
    unparseable output reads differently from one of wrong answers."""
    pts = [(x, (r.get("pattern") or {}).get("invalid")) for x, r in points]
    pts = [(x, s) for x, s in pts if s]
    if pts and any(_mean(s) > 0 for _, s in pts):
        ax.plot([x for x, _ in pts], [100 * _mean(s) for _, s in pts], ":x", color="grey", alpha=0.7, lw=1,
                label=f"{label} invalid (pattern)")


def plot_sizes(summaries: list[dict], out_dir: Path) -> str:
    """Pattern accuracy vs parameters (log x), one panel per task: the best ICL cell and each FT
    protocol at its largest N, with 95% intervals."""
    order = sorted(summaries, key=lambda s: (s.get("n_params") or 0, s["model"]))
    tasks = list(order[0]["tasks"])
    xs = [s.get("n_params") or (i + 1) for i, s in enumerate(order)]
    fig, axes = panels(len(tasks))
    for ax, task in zip(axes[0], tasks):
        series: dict[str, list] = {}
        for s in order:
            t = s["tasks"][task]
            cells = [r for r in t["icl"] if (r.get("pattern") or {}).get("accuracy")]
            best = max(cells, key=lambda r: r["pattern"]["accuracy"]["mean"], default=None)
            series.setdefault("ICL (best k)", []).append(best["pattern"]["accuracy"] if best else None)
            for protocol in sorted({r["protocol"] for r in t["ft"]}):
                rows = [r for r in t["ft"] if r["protocol"] == protocol and (r.get("pattern") or {}).get("accuracy")]
                top = max(rows, key=lambda r: r["n_train"], default=None)
                series.setdefault(f"FT {protocol} (largest N)", []).append(top["pattern"]["accuracy"] if top else None)
        for i, (label, stats) in enumerate(series.items()):
            pts = [(x * (1 + 0.06 * (i - (len(series) - 1) / 2)), st) for x, st in zip(xs, stats) if st]
            if pts:
                ax.errorbar([x for x, _ in pts], [100 * _mean(st) for _, st in pts], yerr=_yerr([st for _, st in pts]),
                            fmt="-o", capsize=3, label=label)
        ax.set_xscale("log")
        # one labelled tick per model (its size), no minor ticks: a log axis spanning about a decade
        # otherwise labels its minor ticks too ("2x10^8 3x10^8 ..."), which overlap
        ax.set_xticks(xs, [params_label(s.get("n_params")) or s["model"] for s in order])
        ax.minorticks_off()
        ax.set_xlabel("parameters")
        ax.set_title(task)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    return save_panels(fig, axes, out_dir / "sizes.png")


def params_label(n: int | None) -> str | None:
    """A parameter count as people write it: 135M, 630M, 1.5B."""
    if not n:
        return None
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def plot(summary: dict, out_dir: Path) -> dict[str, list[str]]:
    """Accuracy vs shots and accuracy vs FT rows (log x), pattern and control, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[str]] = {}
    for task, t in summary["tasks"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        ax = axes[0]
        for split, style in (("pattern", "-o"), ("control", "--s")):
            pts = [(r["k"], r[split]["accuracy"]) for r in t["icl"] if r.get(split)]
            if pts:
                xs = [k for k, _ in pts]
                ys = [100 * _mean(s) for _, s in pts]
                ax.errorbar(xs, ys, yerr=_yerr([s for _, s in pts]), fmt=style, capsize=3, label=f"ICL {split}")
            sc = [(r["k"], r[split].get("shortcut_rate")) for r in t["icl"] if r.get(split) and split == "control"
                  and r[split].get("shortcut_rate")]
            if sc:
                ax.plot([k for k, _ in sc], [100 * _mean(s) for _, s in sc], ":^", label="ICL shortcut rate (control)")
        _invalid(ax, [(r["k"], r) for r in t["icl"]], "ICL")
        ax.set_xscale("symlog", linthresh=1)
        shots = sorted({r["k"] for r in t["icl"]})
        if shots:
            ax.set_xticks(shots, [str(k) for k in shots])
            ax.minorticks_off()
        ax.set_xlabel("demonstrations k")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{task}: ICL")
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=7)
        ax = axes[1]
        protocols = sorted({r["protocol"] for r in t["ft"]})
        for i, protocol in enumerate(protocols):
            rows = sorted((r for r in t["ft"] if r["protocol"] == protocol), key=lambda r: r["n_train"])
            shift = 1.0 + 0.07 * (i - (len(protocols) - 1) / 2)  # protocols side by side, not on top of each other
            for split, style in (("pattern", "-o"), ("control", "--s")):
                pts = [(r["n_train"], r[split]["accuracy"]) for r in rows if r.get(split) and r[split].get("accuracy")]
                if pts:
                    ax.errorbar([n * shift for n, _ in pts], [100 * _mean(s) for _, s in pts],
                                yerr=_yerr([s for _, s in pts]), fmt=style, capsize=3, label=f"FT {protocol} {split}",
                                alpha=0.85)
            _invalid(ax, [(r["n_train"] * shift, r) for r in rows], f"FT {protocol}")
        if t.get("icl_level") is not None:
            ax.axhline(100 * t["icl_level"], color="grey", lw=1, ls=":",
                       label=f"ICL pattern (k={t['comparison']['shots']})")
        base = (t.get("baselines") or {}).get("pattern")
        if base:
            for a in axes:
                a.axhline(100 * base["majority_accuracy"], color="black", lw=0.8, ls="-.", alpha=0.5,
                          label=f"constant `{base['majority_answer']}` (pattern)" if a is axes[1] else None)
        ax.set_xscale("log")
        ns = sorted({r["n_train"] for r in t["ft"]})
        if ns:
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
        ax.set_xlabel("fine-tuning rows N")
        ax.set_title(f"{task}: FT (zero-shot)")
        ax.set_ylabel("accuracy (%)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[task] = [str(path)]
    return paths
