"""Accuracy with intervals: per cell (Wilson score interval over items) and across seeds (t interval
of the mean over demo or train seeds)."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well-behaved at 0% and 100%)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # Rounding can leave the bounds a hair on the wrong side of p at 0% and 100%.
    return (min(lo, p), max(hi, p))


def rate(flags: Sequence[bool]) -> dict:
    """``{"k", "n", "mean", "ci95"}`` for a list of per-item booleans."""
    n, k = len(flags), sum(bool(f) for f in flags)
    return {"k": k, "n": n, "mean": k / n if n else float("nan"), "ci95": list(wilson(k, n))}


def t_quantile_975(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy is pinned; normal approximation otherwise
        return Z95


def over_seeds(values: Iterable[float], n_items: int | None = None) -> dict:
    """Mean, spread and a 95% interval of the mean of per-seed accuracies.

    The interval is the t interval over seeds, widened where needed to the Wilson interval of one
    cell's ``n_items`` at the mean accuracy: with few seeds that agree, the seed spread alone would
    claim a certainty the finite item sample does not support.
    """
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"),
                "n_seeds": 0, "ci95": [float("nan"), float("nan")]}
    mean = statistics.fmean(vals)
    if len(vals) > 1:
        std = statistics.stdev(vals)
        half = t_quantile_975(len(vals) - 1) * std / math.sqrt(len(vals))
        ci = [max(0.0, mean - half), min(1.0, mean + half)]
    else:
        std, ci = 0.0, [float("nan"), float("nan")]
    if n_items:
        lo, hi = wilson(round(mean * n_items), n_items)
        ci = [lo if ci[0] != ci[0] else min(ci[0], lo), hi if ci[1] != ci[1] else max(ci[1], hi)]
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n_seeds": len(vals), "ci95": ci}


def fmt_pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def fmt_ci(stat: dict | None) -> str:
    """``"53.3 [35.1, 70.7]"`` from a rate() or over_seeds() dict."""
    if not stat or stat.get("mean") != stat.get("mean"):
        return "–"
    lo, hi = stat.get("ci95", [float("nan")] * 2)
    if lo != lo:
        return fmt_pct(stat["mean"])
    return f"{fmt_pct(stat['mean'])} [{fmt_pct(lo)}, {fmt_pct(hi)}]"
