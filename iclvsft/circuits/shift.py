"""Shift metrics (numpy): distances between attribution maps ([..., layers, heads + MLP]), their
bootstrap intervals over items, and how well attribution agrees with exact activation patching."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import spearmanr


def _flat(a: np.ndarray) -> np.ndarray:
    """Maps [..., layers, columns] -> [..., layers * columns]."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])  # explicit size: also for zero resamples


def cosine_distance(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """1 - cosine similarity along ``axis`` (NaN where a map is all zeros)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = np.linalg.norm(a, axis=axis), np.linalg.norm(b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - (a * b).sum(axis=axis) / (na * nb)


def l1_distance(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """0.5 * || a/|a|_1 - b/|b|_1 ||_1 along ``axis``, in [0, 1]: 0 = the same relative effects, 1 = no
    overlap (disjoint support, or every shared component with the opposite sign); NaN for an all-zero map."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        an = a / np.abs(a).sum(axis=axis, keepdims=True)
        bn = b / np.abs(b).sum(axis=axis, keepdims=True)
        return 0.5 * np.abs(an - bn).sum(axis=axis)


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Share of the ``k`` components with the largest |effect| in ``a`` that are also in ``b``'s top k
    (over the last axis; 1 = same set)."""
    a, b = np.abs(np.asarray(a, float)), np.abs(np.asarray(b, float))
    k = max(1, min(int(k), a.shape[-1]))
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    hits = (ta[..., :, None] == tb[..., None, :]).any(-1).sum(-1)
    return hits / k


def shift(base: np.ndarray, other: np.ndarray, top_k: int) -> dict[str, Any]:
    """Distances of ``other`` from ``base`` (maps of shape [..., layers, columns]): overall and per layer."""
    fb, fo = _flat(base), _flat(other)
    return {
        "cosine_distance": cosine_distance(fb, fo),
        "l1_distance": l1_distance(fb, fo),
        "topk_overlap": topk_overlap(fb, fo, top_k),
        "per_layer": {"cosine_distance": cosine_distance(base, other), "l1_distance": l1_distance(base, other)},
    }


def interval95(samples: np.ndarray) -> list[float]:
    """The percentile 95% interval of ``samples`` (finite ones, when 1-d); NaNs when there are none."""
    s = samples[np.isfinite(samples)] if samples.ndim == 1 else samples
    if s.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def _interval_axis0(samples: np.ndarray) -> list[list[float]]:
    return [interval95(samples[:, j]) for j in range(samples.shape[1])]


def jsonable(x: Any) -> Any:
    """JSON-friendly floats: rounded, NaN -> None."""
    if isinstance(x, np.ndarray):
        return [jsonable(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(f"{float(x):.6g}")
    if isinstance(x, np.integer):
        return int(x)
    return x


def bootstrap_shift(maps: Mapping[str, np.ndarray], top_k: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Shift of every non-base condition from ``base`` with percentile 95% intervals.

    ``maps[cond]``: per-item maps [N, layers, columns], rows paired across conditions (the same item).
    Each resample draws N item indices with replacement, used by every condition. Also: ``icl - ft``
    (paired) when both exist, and the split-half reference (base vs base on two disjoint halves).
    """
    base = np.asarray(maps["base"], float)
    n = base.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n)) if n_boot > 0 else np.zeros((0, n), dtype=int)
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.repeat(np.arange(n_boot), n), idx.reshape(-1)), 1.0 / n)

    def resampled(x: np.ndarray) -> np.ndarray:
        return np.einsum("bn,nlc->blc", weights, x)

    base_b = resampled(base)
    out: dict[str, Any] = {"n_items": n, "n_boot": n_boot, "top_k": min(top_k, base[0].size), "seed": seed,
                           "conditions": {}}
    samples: dict[str, dict[str, np.ndarray]] = {}
    for cond, x in maps.items():
        if cond == "base":
            continue
        x = np.asarray(x, float)
        point = shift(base.mean(0), x.mean(0), top_k)
        boot = shift(base_b, resampled(x), top_k)
        samples[cond] = boot
        entry = {}
        for name in ("cosine_distance", "l1_distance", "topk_overlap"):
            entry[name] = {"value": jsonable(point[name]), "ci95": jsonable(interval95(boot[name]))}
        entry["per_layer"] = {name: {"value": jsonable(point["per_layer"][name]),
                                     "ci95": jsonable(_interval_axis0(boot["per_layer"][name]))}
                              for name in ("cosine_distance", "l1_distance")}
        out["conditions"][cond] = entry
    if "icl" in samples and "ft" in samples:
        diff: dict[str, Any] = {}
        point_icl = shift(base.mean(0), np.asarray(maps["icl"], float).mean(0), top_k)
        point_ft = shift(base.mean(0), np.asarray(maps["ft"], float).mean(0), top_k)
        for name in ("cosine_distance", "l1_distance", "topk_overlap"):
            d = samples["icl"][name] - samples["ft"][name]
            d = d[np.isfinite(d)]
            diff[name] = {"value": jsonable(point_icl[name] - point_ft[name]), "ci95": jsonable(interval95(d)),
                          "p_icl_greater": jsonable(float((d > 0).mean()) if d.size else float("nan"))}
        out["icl_minus_ft"] = diff
    # Reference: how far two disjoint halves of the items put the base map from itself.
    if n >= 4 and n_boot > 0:
        halves = {name: [] for name in ("cosine_distance", "l1_distance", "topk_overlap")}
        for _ in range(n_boot):
            perm = rng.permutation(n)
            a, b = base[perm[: n // 2]].mean(0), base[perm[n // 2: 2 * (n // 2)]].mean(0)
            s = shift(a, b, top_k)
            for name in halves:
                halves[name].append(float(s[name]))
        out["split_half_base"] = {name: {"median": jsonable(float(np.nanmedian(v))),
                                         "range95": jsonable(interval95(np.array(v)))}
                                  for name, v in halves.items()}
    return out


def agreement(attribution: np.ndarray, activation: np.ndarray, threshold: float = 0.1) -> dict[str, Any]:
    """How well attribution patching approximates exact patching on the same pairs ([N, L, C] each).

    Spearman rank correlation over all pair x component effects pooled, per pair (median) and between
    the mean maps; sign agreement over the pooled effects whose exact |effect| is at least
    ``threshold`` x the largest (the components that matter; tiny effects have no stable sign).
    """
    att, act = _flat(np.asarray(attribution, float)), _flat(np.asarray(activation, float))
    per_pair = [float(spearmanr(a, b).statistic) for a, b in zip(att, act)]
    big = np.abs(act) >= threshold * np.abs(act).max()
    return {"n_pairs": len(per_pair),
            "spearman_pooled": jsonable(float(spearmanr(att.ravel(), act.ravel()).statistic)),
            "spearman_per_pair_median": jsonable(float(np.nanmedian(per_pair))),
            "spearman_mean_map": jsonable(float(spearmanr(att.mean(0), act.mean(0)).statistic)),
            "sign_agreement": jsonable(float((np.sign(att[big]) == np.sign(act[big])).mean())),
            "sign_threshold": threshold, "n_sign_cells": int(big.sum())}
