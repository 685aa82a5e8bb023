"""The study's statistics: accuracy with intervals, paired comparisons, baselines, rows-to-match.

* One run's accuracy: the Wilson interval over items (scipy).
* Several seeds (demo sets or train seeds) on the same items: a two-stage bootstrap that resamples
  seeds, then items, so the interval carries both sources of variance.
* ICL vs FT on the same items (the verdict rule): McNemar's exact test with one seed a side; with
  several, the larger p of the exact sign-flip test of the seed-averaged items and a seeds-and-items
  t-test; Holm-adjusted over a report's verdicts (report.summary.judge). The interval of the
  difference: Tango's score interval (one seed a side), else the hull of the t-interval and the score
  interval of the seed-averaged items. Coverage and type-I error: tests/test_verdict_coverage.py.
* Baselines: what a constant answer scores, so a rate can be read against label bias.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import binomtest
from scipy.stats import t as student_t

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
    Wilson interval over items; several, the percentile interval of a seeds-then-items bootstrap,
    widened where needed to the Wilson interval of the seed-averaged score over the items."""
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
    lo, hi = float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
    if set(np.unique(m)) <= {0.0, 1.0}:
        # Never narrower than one seed's Wilson interval over the items: where every seed scores every
        # item alike (all right, say) the bootstrap has no width, yet n items cannot show 100% exactly.
        w_lo, w_hi = wilson(int(round(mean * n_items)), n_items)
        lo, hi = min(lo, w_lo), max(hi, w_hi)
    return {**out, "ci95": [lo, hi]}


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict:
    """``mean(a) - mean(b)`` for two (seeds x items) 0/1 matrices scored on the same items (same column
    order), with the verdict's p-value and a 95% interval.

    * One seed on each side: McNemar's exact test (:func:`paired_test`) and Tango's score interval
      (:func:`tango_interval`).
    * Several seeds on a side: p is the larger of the exact paired test of the seed-averaged items
      (conditional on the seeds drawn) and the seeds-and-items t-test (:func:`seeds_items_test`, which
      also carries the variance between seeds); the interval is the hull of that t-test's and the
      score interval of the seed-averaged discordant items.
    Both are checked by simulation in tests/test_verdict_coverage.py (coverage, type-I error)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired comparison needs the same items: {a.shape[1]} vs {b.shape[1]}")
    n_items = a.shape[1]
    out: dict = {"a": float(a.mean()), "b": float(b.mean()), "diff": float(a.mean() - b.mean()), "n": n_items,
                 "seeds": [a.shape[0], b.shape[0]], "p": paired_test(a, b)}
    if a.shape[0] == 1 and b.shape[0] == 1:
        only_a = int(np.sum((a[0] > 0.5) & (b[0] <= 0.5)))
        only_b = int(np.sum((b[0] > 0.5) & (a[0] <= 0.5)))
        lo, hi = tango_interval(only_a, only_b, n_items)
        out.update({"ci95": [lo, hi], "test": "McNemar exact", "interval": "Tango score",
                    "discordant": [only_a, only_b]})
        return out
    p_t, lo, hi = seeds_items_test(a, b)
    # Where every seed agrees on every item the t-interval has no width; the score interval of the
    # seed-averaged discordance (fractional counts) keeps it honest there: the hull of the two.
    d = a.mean(axis=0) - b.mean(axis=0)
    lo_s, hi_s = tango_interval(float(np.clip(d, 0, None).sum()), float(np.clip(-d, 0, None).sum()), n_items)
    lo, hi = min(float(lo), lo_s), max(float(hi), hi_s)
    out.update({"p_exact_items": out["p"], "p_seeds_items": float(p_t), "p": max(out["p"], float(p_t)),
                "ci95": [float(lo), float(hi)], "test": "max(exact paired, seeds-and-items t)",
                "interval": "hull of seeds-and-items t and Tango score", "seed_diffs": [float(x) for x in
                                                              (a.mean(axis=1)[:, None] - b.mean(axis=1)[None]).ravel()]})
    return out


def seeds_items_test(a: np.ndarray, b: np.ndarray, z_level: float = 0.975):
    """Two-sided t-test and 95% interval of mean(a) - mean(b) for (..., seeds, items) matrices on the
    same items, with both sources of variance: the per-item differences of the seed means (items) plus
    each side's variance between its seed means (seeds), with Satterthwaite's degrees of freedom. The
    seed term also holds each seed's item noise, which the item term already has: counted twice, so
    the test is conservative when seeds agree (the simulation: type-I 1-4%, coverage 96-99%) and near
    nominal when they differ. Returns (p, low, high); leading dimensions broadcast."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = a.shape[-1]
    d = a.mean(axis=-2) - b.mean(axis=-2)
    diff = d.mean(axis=-1)
    parts = [(d.var(axis=-1, ddof=1) / n, n - 1)]
    parts += [(m.mean(axis=-1).var(axis=-1, ddof=1) / m.shape[-2], m.shape[-2] - 1) for m in (a, b) if m.shape[-2] > 1]
    var = sum(v for v, _ in parts)
    denom = sum(np.where(v > 0, v, 0.0) ** 2 / df for v, df in parts)
    df = np.where(denom > 0, var ** 2 / np.where(denom > 0, denom, 1.0), np.inf)
    se = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, np.abs(diff) / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))
    p = 2 * student_t.sf(t, df)
    half = student_t.ppf(z_level, df) * se
    return p, diff - half, diff + half


def mcnemar(a: Iterable[bool], b: Iterable[bool]) -> float:
    """Exact McNemar p-value (two-sided binomial test on the discordant pairs); 1.0 when none."""
    pairs = list(zip(a, b))
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


# --- the verdict rule -----------------------------------------------------------------------------------
# Hand-written: scipy has neither a paired-proportion score interval nor Holm's procedure (statsmodels,
# which has Holm, is not a dependency for five lines).

Z95 = 1.959963984540054
ALPHA = 0.05


def _tango_stat(only_a: float, only_b: float, n: float, delta: np.ndarray) -> np.ndarray:
    """Tango's (1998) score statistic for H0: p(a) - p(b) = delta on paired binary data, with the
    restricted maximum-likelihood estimate of the discordant cell q = P(b right, a wrong)."""
    A = 2 * n
    B = -only_a - only_b + (2 * n - only_a + only_b) * delta
    C = -only_b * delta * (1 - delta)
    q = (np.sqrt(np.maximum(B * B - 4 * A * C, 0.0)) - B) / (2 * A)
    var = n * (2 * q + delta * (1 - delta))
    return (only_a - only_b - n * delta) / np.sqrt(np.maximum(var, 1e-300))


def tango_interval(only_a, only_b, n, z: float = Z95, iterations: int = 60):
    """95% score interval for the paired difference p(a) - p(b) (Tango 1998): the deltas the score test
    does not reject. ``only_a`` / ``only_b``: items only a / only b got right, of ``n`` pairs. Arrays
    broadcast (the coverage test runs thousands at once); bisection, the statistic being decreasing in
    delta."""
    only_a, only_b = np.asarray(only_a, dtype=float), np.asarray(only_b, dtype=float)
    est = (only_a - only_b) / n
    lo = [np.full_like(est, -1.0), est.copy()]  # the lower bound lies in [-1, est]
    hi = [est.copy(), np.full_like(est, 1.0)]
    for _ in range(iterations):
        mid = (lo[0] + lo[1]) / 2
        above = _tango_stat(only_a, only_b, n, mid) > z
        lo = [np.where(above, mid, lo[0]), np.where(above, lo[1], mid)]
        mid = (hi[0] + hi[1]) / 2
        below = _tango_stat(only_a, only_b, n, mid) < -z
        hi = [np.where(below, hi[0], mid), np.where(below, mid, hi[1])]
    low, high = (lo[0] + lo[1]) / 2, (hi[0] + hi[1]) / 2
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def paired_test(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Two-sided exact paired test of (seeds x items) 0/1 matrices on the same items: the sign-flip
    (permutation) test of the per-item differences of the seed means. With one seed on each side the
    differences are -1, 0, +1 and this is McNemar's exact test on the discordant items; with several,
    the same test on the seed-averaged items (conditional on the seeds drawn). The null distribution
    is computed exactly (the differences are multiples of 1/(seeds_a x seeds_b))."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    k = np.rint((a.mean(axis=0) - b.mean(axis=0)) * a.shape[0] * b.shape[0]).astype(int)  # integer differences
    w, observed = np.abs(k[k != 0]), abs(int(k.sum()))
    if w.size == 0:
        return 1.0
    total = int(w.sum())
    dist = np.zeros(2 * total + 1)  # P(sum of +-w_i = t - total)
    dist[total] = 1.0
    for wi in w:
        dist = 0.5 * (np.roll(dist, wi) + np.roll(dist, -wi))  # no wrap: |partial sums| <= total
    values = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(values) >= observed].sum()))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None entries stay None and are not in the family)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, running = len(order), 0.0
    adjusted: list[float | None] = [None] * len(pvalues)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(diff: dict | None, adjusted_p: float | None = None, alpha: float = ALPHA) -> str:
    """ICL minus FT on pattern items: "supports" the paper when the exact paired test, Holm-adjusted
    over the report's family of verdicts, rejects at ``alpha`` and ICL is ahead, "contradicts" when it
    rejects and FT is ahead, "no clear difference" otherwise (``adjusted_p`` None: the raw p, a family
    of one)."""
    if not diff:
        return "incomplete"
    p = diff["p"] if adjusted_p is None else adjusted_p
    if p >= alpha or diff["diff"] == 0:
        return "no clear difference"
    return "supports" if diff["diff"] > 0 else "contradicts"


def rows_to_match(points: Sequence[tuple[int, dict | None]], icl: dict | None, baseline: float | None,
                  alpha: float = ALPHA) -> int | str:
    """The smallest N at which FT is not significantly worse than ICL (the exact paired test at
    ``alpha``, uncorrected: the lenient direction for "matched" is not made more lenient) and stays so
    for every larger N tried; "not reached" if none; "not defined" when ICL is not above what a
    constant answer scores (its 95% interval's lower bound at or below ``baseline``): matching an ICL
    level a constant reaches says nothing. ``points``: (N, the paired ICL - FT dict at that N, or None
    when that cell is missing); ``icl``: the ICL cell's accuracy (mean, ci95)."""
    if not icl or baseline is None or not icl["ci95"][0] > baseline:
        return "not defined"
    found: int | str = "not reached"
    for n, diff in sorted(points, key=lambda p: p[0]):
        worse = diff is None or (diff["diff"] > 0 and diff["p"] < alpha)
        found = "not reached" if worse else (found if found != "not reached" else n)
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
