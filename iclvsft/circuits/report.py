"""The circuit-shift report section (markdown), from circuits.json's content."""
from __future__ import annotations

from typing import Any

from ..config import CIRCUIT_CONDITIONS as CONDITIONS


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("value") is None:
        return "–"
    lo, hi = stat.get("ci95") or (None, None)
    if lo is None or hi is None:
        return f"{stat['value']:.{digits}f}"
    return f"{stat['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _ordered(by_condition: dict) -> list[tuple[str, Any]]:
    """Entries in the order base, icl, ft (JSON files keep keys sorted)."""
    return [(c, by_condition[c]) for c in CONDITIONS if c in by_condition]


def _verdict(diff: dict, similarity: bool, shifts: dict[str, dict] | None = None, reference: float | None = None) -> str:
    """Whether a paired ICL - FT difference supports the paper's claim (ICL shifts more than FT). A shift
    that is no larger than the split-half noise reference (base vs base on two halves of the items) is
    not a shift: then "no clear difference", whatever the interval says."""
    lo, hi = diff.get("ci95") or (None, None)
    if lo is None or hi is None:
        return "no interval"
    icl_more, ft_more = (hi < 0, lo > 0) if similarity else (lo > 0, hi < 0)
    if (icl_more or ft_more) and reference is not None and shifts:
        mover = shifts.get("icl" if icl_more else "ft") or {}
        value = mover.get("value")
        beyond = value is not None and (value < reference if similarity else value > reference)
        if not beyond:
            return "no clear difference (the larger shift is within the base-vs-base noise)"
    if icl_more:
        return "ICL shifts more (supports the claim)"
    if ft_more:
        return "FT shifts more (contradicts the claim)"
    return "no clear difference (interval includes 0)"


SHIFT_METRICS = ("cosine_distance", "l1_distance", "topk_overlap")


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _shift_table(s: dict) -> list[str]:
    """Each condition's distance from base, ICL - FT, the split-half reference and the verdicts."""
    lines = ["", _row("shift from base", "cosine distance (1 − cosine similarity, 0-2)", "normalised L1 (0-2)",
                      f"top-{s['top_k']} overlap (1 = same)"), "|---|---|---|---|"]
    for cond, e in _ordered(s["conditions"]):
        lines.append(_row(cond, *(_fmt(e[name]) for name in SHIFT_METRICS)))
    if "icl_minus_ft" in s:
        lines.append(_row("ICL - FT", *(_fmt(s["icl_minus_ft"][name]) for name in SHIFT_METRICS)))
    if "split_half_base" in s:
        h = s["split_half_base"]
        lines.append(_row("base vs base, two halves of the items (reference)",
                          *(f"{h[k]['median']:.3f}" if h[k]["median"] is not None else "–" for k in SHIFT_METRICS)))
    if "icl_minus_ft" in s:
        half = s.get("split_half_base") or {}

        def reading(name: str) -> str:
            shifts = {cond: e[name] for cond, e in s["conditions"].items()}
            return _verdict(s["icl_minus_ft"][name], name == "topk_overlap", shifts, (half.get(name) or {}).get("median"))

        lines += ["", "ICL - FT is the paired difference of the two shifts (for the top-k overlap, a similarity, "
                      "a negative difference means ICL moved further from base); the reference row is the noise "
                      "floor: a shift no larger than it is not read as one. Per metric: "
                      + "; ".join(f"{name}: {reading(name)}" for name in SHIFT_METRICS) + "."]
    return lines


def _agreement_line(agree: dict[str, dict]) -> str:
    return "Attribution vs exact activation patching: " + "; ".join(
        f"{cond}: Spearman {a['spearman_pooled']:.3f} over pair x component effects ({a['n_pairs']} pairs; "
        f"median pair {a['spearman_per_pair_median']:.3f}), same sign on {a['sign_agreement']:.0%} of the "
        f"{a['n_sign_cells']} effects >= {a['sign_threshold']:g} x the largest" for cond, a in agree.items()) + "."


def _skipped_line(skipped: dict[str, int]) -> str:
    """What was left out on the way to the pairs: items with no usable edit, and rejected edits by reason."""
    reasons = {k: v for k, v in skipped.items() if k != "items_without_pair" and v}
    text = f"Items without a usable edit: {skipped.get('items_without_pair', 0)}"
    if reasons:
        text += "; candidate edits rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return text + "."


def report_section(result: dict, link_prefix: str = "", base_invalid: dict[str, float] | None = None) -> str:
    """A markdown section (for the reproduce report and circuits.md) from circuits.json's content;
    heatmap links (relative to the results folder) get ``link_prefix`` in front. ``base_invalid``: per
    task, the base model's zero-shot invalid share on pattern items (from the study), to say where the
    shift partly measures learning the answer format."""
    grid = result["grid"]
    lines = ["## Circuit shift", "",
             f"Model {result['model']}; method {result['method']}; corruption {result['corruption']} on "
             f"{result['split']} items; grid {grid['layers']} layers x {grid['heads']} heads + MLP. "
             "Shift = distance of each condition's mean attribution map from the base (zero-shot) map: "
             "1 - cosine and normalised L1 (0 = same, higher = more shift), top-k overlap (1 = same top-k "
             "components). Brackets: 95% bootstrap interval over items.", ""]
    for task, t in result["tasks"].items():
        lines += [f"### {task}", "",
                  f"{t['n_pairs']} clean/corrupted pairs; ICL with {t['shots']} demonstrations; FT adapter: "
                  f"{t.get('adapter') or 'none (FT condition not run)'}. {_skipped_line(t.get('skipped') or {})}", "",
                  "| condition | logit diff clean | logit diff corrupted | effect (clean - corrupted) |",
                  "|---|---|---|---|"]
        for cond, e in _ordered(t["conditions"]):
            lines.append(_row(cond, f"{e['logit_diff_clean']:.2f}", f"{e['logit_diff_corrupt']:.2f}",
                              _fmt(e["effect"], 2)))
        if t.get("shift"):
            lines += _shift_table(t["shift"])
        share = (base_invalid or {}).get(task)
        if share is not None and share > 0.5:
            lines += ["", f"Zero-shot, {100 * share:.0f}% of the base model's answers on pattern items are invalid "
                          "(not in the task's answer format): the shift from base partly measures learning the "
                          "answer format, not only the pattern."]
        agree = {cond: e["agreement"] for cond, e in _ordered(t["conditions"]) if "agreement" in e}
        if agree:
            lines += ["", _agreement_line(agree)]
        plots = result.get("plots", {}).get(task, {})
        if plots:
            order = [k for k in ("base", "icl", "ft", "icl_minus_base", "ft_minus_base") if k in plots]
            lines += ["", "Heatmaps: " + ", ".join(f"[{k}]({link_prefix}{plots[k]})" for k in order) + "."]
        lines.append("")
    return "\n".join(lines) + "\n"
