"""The study's statistics: accuracy with intervals, paired comparisons, baselines, rows-to-match.

* One run's accuracy: the Wilson interval over items (scipy).
* Several seeds (demo sets or train seeds) on the same items: a two-stage bootstrap that resamples
  seeds, then items, so the interval carries both sources of variance.
* ICL vs FT on the same items: the paired version of that bootstrap (the same resampled items on
  both sides), plus McNemar's exact test when each side has one seed.
* Baselines: what a constant answer scores, so a rate can be read against label bias.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import binomtest

N_BOOT = 2000
BOOT_SEED = 20241006


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well-behaved at 0% and 100%)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    p = successes / n  # rounding can leave a bound a hair on the wrong side of p at 0% and 100%
    return (min(max(0.0, float(ci.low)), p), max(min(1.0, float(ci.high)), p))


def rate(flags: Sequence[bool]) -> dict:
    """``{"k", "n", "mean", "ci95"}`` for a list of per-item booleans."""
    n, k = len(flags), sum(bool(f) for f in flags)
    return {"k": k, "n": n, "mean": k / n if n else float("nan"), "ci95": list(wilson(k, n))}


# --- several seeds on the same items --------------------------------------------------------------
# A two-stage (seeds, then items) bootstrap is written here because scipy.stats.bootstrap resamples
# one level only; with 2-3 seeds the seed stage is coarse, which the interval then honestly shows.

def _resampled_means(matrix: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of a (seeds x items) 0/1 matrix, the item resamples ``items`` given per draw."""
    n_seeds = matrix.shape[0]
    seeds = rng.integers(0, n_seeds, size=(items.shape[0], n_seeds))
    # mean over the drawn seeds and the drawn items: per replicate b, mean of matrix[seeds[b]][:, items[b]]
    per_item = matrix.T[items]  # (B, n_items, n_seeds)
    picked = np.take_along_axis(per_item, seeds[:, None, :].repeat(items.shape[1], axis=1), axis=2)
    return picked.mean(axis=(1, 2))


def seed_item_interval(matrix: Sequence[Sequence[float]], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """Mean and 95% interval of a (seeds x items) matrix of per-item scores: one seed gives the
    Wilson interval over items; several, the percentile interval of a seeds-then-items bootstrap."""
    m = np.asarray(matrix, dtype=float)
    n_seeds, n_items = m.shape
    mean = float(m.mean()) if m.size else float("nan")
    out = {"mean": mean, "n": n_items, "n_seeds": n_seeds,
           "seed_means": [float(x) for x in m.mean(axis=1)] if n_items else []}
    if n_items == 0:
        return {**out, "ci95": [float("nan"), float("nan")]}
    if n_seeds == 1 and set(np.unique(m)) <= {0.0, 1.0}:
        return {**out, "ci95": list(wilson(int(m.sum()), n_items))}
    rng = np.random.default_rng(seed)
    means = _resampled_means(m, rng.integers(0, n_items, size=(n_boot, n_items)), rng)
    return {**out, "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]}


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                      seed: int = BOOT_SEED) -> dict:
    """``mean(a) - mean(b)`` for two (seeds x items) matrices scored on the same items (same column
    order), with a 95% interval from the paired bootstrap: each replicate draws one item resample
    used by both sides, and each side's seeds independently. With one seed on each side, also
    McNemar's exact test on the discordant items."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired comparison needs the same items: {a.shape[1]} vs {b.shape[1]}")
    n_items = a.shape[1]
    out: dict = {"a": float(a.mean()), "b": float(b.mean()), "diff": float(a.mean() - b.mean()), "n": n_items,
                 "seeds": [a.shape[0], b.shape[0]]}
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n_items, size=(n_boot, n_items))
    diffs = _resampled_means(a, items, rng) - _resampled_means(b, items, rng)
    out["ci95"] = [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]
    if a.shape[0] == 1 and b.shape[0] == 1:
        out["mcnemar_p"] = mcnemar(a[0] > 0.5, b[0] > 0.5)
    return out


def mcnemar(a: Iterable[bool], b: Iterable[bool]) -> float:
    """Exact McNemar p-value (two-sided binomial test on the discordant pairs); 1.0 when none."""
    pairs = list(zip(a, b))
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def verdict(diff: dict | None) -> str:
    """ICL minus FT on pattern items: "supports" the paper when the whole interval is above 0,
    "contradicts" when below, "no clear difference" when it contains 0."""
    if not diff:
        return "incomplete"
    lo, hi = diff["ci95"]
    return "supports" if lo > 0 else "contradicts" if hi < 0 else "no clear difference"


def rows_to_match(points: Sequence[tuple[int, dict]], level: float) -> int | None:
    """The smallest N whose interval reaches ``level`` (upper bound >= level) and stays there for
    every larger N tried; None ("not reached") otherwise. ``points``: (N, interval dict)."""
    found = None
    for n, stat in sorted(points, key=lambda p: p[0]):
        reaches = stat is not None and stat["ci95"][1] >= level
        found = (found if found is not None else n) if reaches else None
    return found


# --- baselines --------------------------------------------------------------------------------------

def baselines(answers: Sequence[str], shortcut_answers: Sequence[str | None]) -> dict:
    """What constant predictors score on one split: the best constant answer (majority label) and the
    always-shortcut predictor (accuracy and shortcut rate)."""
    n = len(answers)
    if n == 0:
        return {}
    label, count = Counter(answers).most_common(1)[0]
    out = {"n": n, "majority_answer": label, "majority_accuracy": count / n,
           "majority_shortcut_rate": None, "shortcut_accuracy": None}
    if any(s is not None for s in shortcut_answers):
        out["majority_shortcut_rate"] = sum(s == label for s in shortcut_answers) / n
        out["shortcut_accuracy"] = sum(s == a for s, a in zip(shortcut_answers, answers)) / n
    return out


def shortcut_balanced(predictions: Sequence[str | None], shortcut_answers: Sequence[str | None]) -> dict | None:
    """How much the predictions follow the shortcut, corrected for label bias: the mean over the
    shortcut's labels L of P(prediction == L | shortcut says L) (balanced accuracy against the
    shortcut). On control items, where the shortcut is wrong: a constant answer scores 0.5 whatever
    the label balance, always following the shortcut 1.0, always computing the answer 0. Needs at
    least two distinct shortcut answers (None otherwise: then label bias and shortcut use cannot be
    told apart on these items)."""
    by_label: dict[str, list[bool]] = {}
    for p, s in zip(predictions, shortcut_answers):
        if s is not None:
            by_label.setdefault(s, []).append(p == s)
    if len(by_label) < 2 or len(by_label) > 8:
        return None
    per_label = {label: sum(v) / len(v) for label, v in sorted(by_label.items())}
    return {"mean": sum(per_label.values()) / len(per_label), "per_label": per_label,
            "n": sum(len(v) for v in by_label.values()), "constant_answer": 1 / len(per_label)}


def fmt_pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def fmt_ci(stat: dict | None) -> str:
    """``"53.3 [35.1, 70.7]"`` from a rate() or seed_item_interval() dict."""
    if not stat or stat.get("mean") != stat.get("mean"):
        return "–"
    lo, hi = stat.get("ci95", [float("nan")] * 2)
    if lo != lo or hi != hi:  # no interval (NaN bounds): the mean alone
        return fmt_pct(stat["mean"])
    return f"{fmt_pct(stat['mean'])} [{fmt_pct(lo)}, {fmt_pct(hi)}]"
