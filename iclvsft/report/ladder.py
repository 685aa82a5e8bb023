"""The ladder's numbers and its report section "From the authors' setup to ours".

Per rung and task: the ICL cell the rung reports (the best k on pattern items by the authors' substring
score under ``max``, the fixed k under ``fixed``), the fine-tuned model(s) zero-shot (one per train seed),
each with pattern and control accuracy and the shortcut rate under strict scoring and under the authors'
substring scoring side by side, the fine-tuned model's most frequent completions, and the paired ICL − FT
difference on the same pattern items (strict) with the study's verdict.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..config import Config
from ..evaluate.cells import cell_keys
from ..evaluate.tables import aligned
from ..metrics import baselines, fmt_ci, fmt_pct, paired_difference
from .plots import _mean, _yerr, panels, save_panels
from .summary import condition, invalid_flagged, judge, planned_rows, preliminary_verdict, seeds_by_k

# (accuracy metric, shortcut metric, per-row field) under each scoring
SCORING = {"strict": ("accuracy", "shortcut_rate", "correct"),
           "substring": ("substring_accuracy", "substring_shortcut_rate", "substring_correct")}


def _sides(seeds: list[list[dict]]) -> dict[str, dict]:
    """One side (ICL or FT) read by each scoring, from one computation of its condition."""
    c = condition(seeds)
    pattern, control = c.get("pattern") or {}, c.get("control") or {}
    return {scoring: {"pattern": pattern.get(acc), "control": control.get(acc), "shortcut": control.get(shortcut),
                      "invalid": pattern.get("invalid")} for scoring, (acc, shortcut, _) in SCORING.items()}


def select_icl(by_k: dict[int, list[list[dict]]], select: str, fixed_k: int, field: str) -> int | None:
    """The k a rung reports: ``fixed_k``, or (``max``) the k with the highest pattern accuracy under
    ``field`` (ties: the smaller k), as the authors reported the best shot count."""
    if select == "fixed":
        return fixed_k if fixed_k in by_k else None
    best, best_k = -1.0, None
    for k, seeds in sorted(by_k.items()):
        if k == 0:
            continue
        flags = [float(r[field]) for rows in seeds for r in rows if r["split"] == "pattern" and r[field] is not None]
        mean = sum(flags) / len(flags) if flags else -1.0
        if mean > best:
            best, best_k = mean, k
    return best_k


def _completions(ft_seeds: list[list[dict]], top: int = 3) -> dict:
    """The fine-tuned model's most frequent completions on pattern items (all seeds): what it answers."""
    texts = [r["completion"] for rows in ft_seeds for r in rows if r["split"] == "pattern"]
    counts = Counter(texts)
    return {"n": len(texts), "top": [[text, n] for text, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]}


def rung_task(task: str, icl_rows: list[dict], ft_seed_rows: list[list[dict]], select: str, fixed_k: int,
              max_invalid: float = 1.0) -> dict:
    """One task of one rung: the ICL cell (``fixed_k``, or the best k by the authors' substring score), the
    fine-tuned model(s) (one list of rows per train seed), both read by strict and by substring scoring; the
    verdict is the study's: strict scoring, the exact paired test, no verdict past ``max_invalid``."""
    by_k = seeds_by_k(icl_rows, task)
    k = select_icl(by_k, select, fixed_k, SCORING["substring"][2])
    ft_seeds = [rows for rows in ([r for r in seed if r["task"] == task and r["k"] == 0] for seed in ft_seed_rows)
                if rows]
    out: dict[str, Any] = {"k": k}
    icl, ft = _sides(by_k[k]) if k is not None else None, _sides(ft_seeds) if ft_seeds else None
    for scoring in SCORING:
        out[scoring] = {"icl": icl[scoring] if icl else None, "ft": ft[scoring] if ft else None}
    out["icl"], out["ft"], out["icl_minus_ft"] = out["strict"]["icl"], out["strict"]["ft"], None
    out["ft_seeds"] = len(ft_seeds)
    if k is not None and ft_seeds:
        icl_p = [[r for r in rows if r["split"] == "pattern"] for rows in by_k[k]]
        ft_p = [[r for r in rows if r["split"] == "pattern"] for rows in ft_seeds]
        ids, matrix = aligned(icl_p + ft_p, SCORING["strict"][2])
        if ids:
            out["icl_minus_ft"] = paired_difference(matrix[:len(icl_p)], matrix[len(icl_p):])
    # the study's rule: a side over the invalid limit (strict parse, on pattern items) gives no verdict
    out["invalid_flagged"] = invalid_flagged({"ICL": (out["icl"] or {}).get("invalid"),
                                              "FT": (out["ft"] or {}).get("invalid")}, max_invalid)
    out["verdict"] = preliminary_verdict(out["icl_minus_ft"], out["invalid_flagged"])  # final once judged
    out["ft_completions"] = _completions(ft_seeds)
    items = next(iter(by_k.values()), [[]])[0]
    out["baselines"] = {s: baselines([r["answer"] for r in items if r["split"] == s],
                                     [r["shortcut_answer"] for r in items if r["split"] == s])
                        for s in ("pattern", "control") if any(r["split"] == s for r in items)}
    return out


def ladder_summary(rungs: list, config: Config) -> dict:
    """Every rung's numbers (``rungs``: :func:`iclvsft.jobs.plan_ladder`)."""
    out = {"config": config.name, "model": config.model, "shortened": config.ladder.shortened,
           "rungs": []}
    for rung in rungs:
        lad = rung.config.ladder
        ev = rung.config.eval
        icl_rows = planned_rows(rung.icl_dir / "metrics.json", cell_keys(rung.tasks, ev.shots, ev.demo_seeds))
        ft_rows: dict[str, list[list[dict]]] = {}
        for ft in rung.ft:
            rows = planned_rows(ft.eval_dir / "metrics.json", cell_keys(ft.tasks, ft.config.eval.shots, ev.demo_seeds))
            for t in ft.tasks:
                ft_rows.setdefault(t, []).append(rows)
        out["rungs"].append({
            "index": rung.index, "name": rung.name, "why": rung.why, "changes": rung.changes,
            "model": rung.config.model,
            "icl_select": lad.icl_select, "train_seeds": list(lad.train_seeds),
            "folders": {"icl": str(rung.icl_dir), "ft": {"+".join(ft.tasks) + f"/s{ft.seed}": str(ft.ft_dir)
                                                         for ft in rung.ft}},
            "tasks": {t: rung_task(t, icl_rows, ft_rows.get(t, []), lad.icl_select, lad.fixed_k,
                                   config.reproduce.max_invalid) for t in rung.tasks}})
    # every verdict of the ladder is one family (Holm)
    out["family"] = {"size": judge([t for r in out["rungs"] for t in r["tasks"].values()]), "alpha": 0.05,
                     "correction": "Holm"}
    return out


def _pct(stat: dict | None) -> str:
    return fmt_pct(stat["mean"]) if stat else "–"


def _diff(d: dict | None) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{100 * d['diff']:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}]"


def _adjusted(t: dict) -> str:
    p = t.get("p_adjusted")
    return "" if p is None else f", p<sub>Holm</sub> {p:.2g}" if p >= 0.001 else ", p<sub>Holm</sub> <0.001"


SHORT_VERDICT = {"supports": "ICL > FT", "contradicts": "FT > ICL", "no clear difference": "≈", "incomplete": "–",
                 "no verdict (invalid)": "no verdict: invalid", "ICL only": "–"}


def _completion_cell(c: dict) -> str:
    if not c or not c["n"]:
        return "–"
    return ", ".join(f"`{text!r}` {100 * n / c['n']:.0f}%" for text, n in c["top"])


def ladder_section(summary: dict, plot_dir: Path, link_prefix: str = "") -> str:
    rungs = summary["rungs"]
    tasks = list(rungs[0]["tasks"]) if rungs else []
    lines = ["## From the authors' setup to ours", "",
             "Rung 0 is the authors' setup; each next rung changes one factor, cumulatively, and ends at our protocol. "
             "Every rung reports ICL and FT on the same test items, read two ways side by side: strict (the completion "
             "must start with the answer; the study's scoring) and substring (the authors': the gold string anywhere "
             "in the completion). The verdict is the study's: *ICL > FT* (the paper's claim) or *FT > ICL* where the "
             "exact paired test of ICL − FT on pattern items under strict scoring rejects at 5% after Holm's "
             f"correction over every verdict of this ladder ({summary.get('family', {}).get('size', 0)} comparisons), "
             "*≈* where it does not; *no verdict: invalid* where a compared cell's invalid share on pattern items "
             "(strict parse) exceeds reproduce.max_invalid: such a cell is not a measurement of what was learned, "
             "whatever the scoring.", ""]
    if summary.get("shortened"):
        lines += [f"Shortened to run on this machine: {summary['shortened']}", ""]
    lines += ["| rung | change | ICL cell | FT seeds | " + " | ".join(f"{t}: ICL − FT (verdict)" for t in tasks) + " |",
              "|---|---|---|---|" + "---|" * len(tasks)]
    for r in rungs:
        sel = "best k" if r["icl_select"] == "max" else "fixed k"
        cells = [f"{_diff(t['icl_minus_ft'])} ({SHORT_VERDICT[t['verdict']]}{_adjusted(t)})" for t in r["tasks"].values()]
        lines.append(f"| {r['index']} | {r['name']} | {sel} | {len(r.get('train_seeds', [0]))} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Pattern accuracy (strict, with its 95% interval; substring beside it), control accuracy, shortcut "
              "rate on control and invalid share on pattern items (strict parse), in %, for the ICL cell (k) and the "
              "fine-tuned model(s):", "",
              "| rung | task | ICL k | ICL pattern | ICL pattern (substring) | ICL control | ICL shortcut | ICL invalid "
              "| FT pattern | FT pattern (substring) | FT control | FT shortcut | FT invalid |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rungs:
        for task, t in r["tasks"].items():
            icl, ft = t["icl"] or {}, t["ft"] or {}
            sub = t.get("substring") or {}
            icl_sub, ft_sub = sub.get("icl") or {}, sub.get("ft") or {}
            lines.append(f"| {r['index']} | {task} | {t['k'] if t['k'] is not None else '–'} | "
                         f"{fmt_ci(icl.get('pattern'))} | {_pct(icl_sub.get('pattern'))} | {_pct(icl.get('control'))} | "
                         f"{_pct(icl.get('shortcut'))} | {_pct(icl.get('invalid'))} | "
                         f"{fmt_ci(ft.get('pattern'))} | {_pct(ft_sub.get('pattern'))} | {_pct(ft.get('control'))} | "
                         f"{_pct(ft.get('shortcut'))} | {_pct(ft.get('invalid'))} |")
    lines += ["", "What the fine-tuned model answers: its most frequent completions on pattern items (share of "
              "items, all seeds):", "", "| rung | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in rungs:
        lines.append(f"| {r['index']} | " + " | ".join(_completion_cell(t.get("ft_completions") or {})
                                                    for t in r["tasks"].values()) + " |")
    lines += ["", "What each rung changes, and why in this order:", ""]
    for r in rungs:
        changes = ", ".join(f"`{k}={v}`" for k, v in r["changes"].items()) or "nothing"
        lines.append(f"{r['index']}. **{r['name']}**: {r['why']} ({changes})")
    lines.append("")
    if rungs:
        lines += ["Constant-answer baselines on pattern items (rung 0 formats): " + "; ".join(
            f"{task} `{b['pattern']['majority_answer']}` {fmt_pct(b['pattern']['majority_accuracy'])}"
            for task, b in ((t, rungs[0]["tasks"][t]["baselines"]) for t in tasks) if b.get("pattern")) + ".", ""]
        path = plot_ladder(summary, plot_dir)
        lines += [f"![ladder]({link_prefix}{Path(path).name})", ""]
    return "\n".join(lines)


def plot_ladder(summary: dict, out_dir: Path) -> str:
    """Pattern accuracy of ICL and FT per rung, one panel per task, with 95% intervals."""
    rungs = [r for r in summary["rungs"] if r.get("model", summary["model"]) == summary["model"]]  # the main model's
    tasks = list(rungs[0]["tasks"])
    fig, axes = panels(len(tasks), width=3.6)
    xs = [r["index"] for r in rungs]
    for ax, task in zip(axes[0], tasks):
        for side, offset, style in (("icl", -0.08, "-o"), ("ft", 0.08, "-s")):
            stats = [(r["tasks"][task][side] or {}).get("pattern") or {} for r in rungs]
            ax.errorbar([x + offset for x in xs], [100 * _mean(s) for s in stats], yerr=_yerr(stats), fmt=style,
                        capsize=3, label="ICL (reported k)" if side == "icl" else "FT zero-shot")
        ax.set_title(task)
        ax.set_xticks(xs)
        ax.set_xlabel("rung")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    return save_panels(fig, axes, out_dir / "ladder.png", legend_size=8)
