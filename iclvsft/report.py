"""The study's report: ICL vs FT per task, from the metrics files that test.py writes.

Inputs are plain metrics.json files (``iclvsft.evaluate``): one for the ICL sweep of a model, one
per fine-tuned model evaluated zero-shot. Outputs: ``report.md`` (tables with 95% intervals, the
smallest N at which FT matches the best ICL cell, a verdict per task), ``summary.json`` (the same
numbers for programs) and PNG plots (accuracy vs shots, accuracy vs FT rows on a log axis).

Verdict rule, per task, on the ``pattern`` split (the paper's claim is that ICL picks up the
implicit pattern better than FT): compare the best ICL condition with the best FT condition.
"supports" when ICL's accuracy is higher and the two 95% intervals do not overlap, "contradicts"
when FT's is higher and they do not overlap, "inconclusive" otherwise. Control accuracy and the
shortcut rate are shown beside it, since a high pattern score with a high shortcut rate means the
model learned the shortcut, not the computation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text, slug, write_json
from .metrics import fmt_ci, fmt_pct


@dataclass
class FTResult:
    """One fine-tuned model's zero-shot metrics for one task."""

    protocol: str
    method: str
    tasks: tuple[str, ...]  # the tasks it was fine-tuned on (one, or a mixed set)
    n_train: int
    train_seed: int
    metrics_path: Path
    train_summary: dict = field(default_factory=dict)


def _stat(entry: dict | None, name: str) -> dict | None:
    return entry.get(name) if entry else None


def _mean(stat: dict | None) -> float:
    return stat["mean"] if stat and stat.get("mean") == stat.get("mean") else float("nan")


def _ci(stat: dict | None) -> tuple[float, float]:
    if not stat:
        return (float("nan"), float("nan"))
    lo, hi = stat.get("ci95", [float("nan")] * 2)
    return (lo, hi)


def load_conditions(metrics_path: Path) -> dict[tuple[str, int, str], dict]:
    """``(task, k, split) -> by_condition entry`` from a test.py metrics.json."""
    m = json.loads(Path(metrics_path).read_text())
    return {(e["task"], e["k"], e["split"]): e for e in m["by_condition"]}


def _aggregate_seeds(entries: list[dict]) -> dict:
    """FT over train seeds: mean and t interval of the per-seed accuracies (as for demo seeds)."""
    from .metrics import over_seeds

    out: dict[str, Any] = {"n_seeds": len(entries)}
    for name in ("accuracy", "shortcut_rate", "invalid", "lenient_accuracy", "constrained_accuracy"):
        vals = [_mean(e.get(name)) for e in entries if e.get(name)]
        if not vals:
            out[name] = None
        elif len(vals) == 1:
            out[name] = next(e[name] for e in entries if e.get(name))
        else:
            n_items = next(e[name]["n"] for e in entries if e.get(name) and "n" in e[name]) if any(
                "n" in (e.get(name) or {}) for e in entries) else None
            out[name] = over_seeds(vals, n_items=n_items)
    return out


def build_summary(tasks: list[str], icl_metrics: Path | None, ft_results: list[FTResult],
                  model: str, config_name: str) -> dict:
    icl = load_conditions(icl_metrics) if icl_metrics and Path(icl_metrics).is_file() else {}
    summary: dict[str, Any] = {"model": model, "config": config_name, "tasks": {}}
    for task in tasks:
        t: dict[str, Any] = {"icl": [], "ft": [], "protocols": {}}
        shots = sorted({k for (tk, k, _s) in icl if tk == task})
        for k in shots:
            row = {"k": k}
            for split in ("pattern", "control"):
                e = icl.get((task, k, split))
                row[split] = {n: _stat(e, n) for n in ("accuracy", "shortcut_rate", "invalid", "lenient_accuracy",
                                                       "constrained_accuracy")} if e else None
                if e:
                    row["n_seeds"] = e["accuracy"].get("n_seeds", 1)
            t["icl"].append(row)
        groups: dict[tuple[str, str, int], list[FTResult]] = {}
        for r in ft_results:
            if task in r.tasks:
                groups.setdefault((r.protocol, r.method, r.n_train), []).append(r)
        for (protocol, method, n), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            row = {"protocol": protocol, "method": method, "n_train": n, "train_seeds": sorted(r.train_seed for r in runs),
                   "train": [{"seed": r.train_seed, "steps": r.train_summary.get("steps"),
                              "final_loss": r.train_summary.get("final_loss")} for r in sorted(runs, key=lambda r: r.train_seed)]}
            present = False
            for split in ("pattern", "control"):
                entries = []
                for r in runs:
                    cond = load_conditions(r.metrics_path).get((task, 0, split)) if r.metrics_path.is_file() else None
                    if cond:
                        entries.append(cond)
                row[split] = _aggregate_seeds(entries) if entries else None
                present = present or bool(entries)
            if present:
                t["ft"].append(row)
        best_icl = max((r for r in t["icl"] if r.get("pattern")), key=lambda r: _mean(r["pattern"]["accuracy"]),
                       default=None)
        best_ft = max((r for r in t["ft"] if r.get("pattern")), key=lambda r: _mean(r["pattern"]["accuracy"]),
                      default=None)
        t["best_icl"] = best_icl and {"k": best_icl["k"], "pattern": best_icl["pattern"]["accuracy"]}
        t["best_ft"] = best_ft and {"protocol": best_ft["protocol"], "method": best_ft["method"],
                                    "n_train": best_ft["n_train"], "pattern": best_ft["pattern"]["accuracy"]}
        t["ft_rows_to_match_icl"] = {}
        for protocol in sorted({r["protocol"] for r in t["ft"]}):
            rows = sorted((r for r in t["ft"] if r["protocol"] == protocol and r.get("pattern")), key=lambda r: r["n_train"])
            match = None
            if best_icl:
                target = _mean(best_icl["pattern"]["accuracy"])
                match = next((r["n_train"] for r in rows if _mean(r["pattern"]["accuracy"]) >= target), None)
            t["ft_rows_to_match_icl"][protocol] = match
        t["verdict"] = verdict(best_icl and best_icl["pattern"]["accuracy"], best_ft and best_ft["pattern"]["accuracy"])
        summary["tasks"][task] = t
    return summary


def verdict(icl: dict | None, ft: dict | None) -> str:
    if not icl or not ft:
        return "incomplete"
    (il, ih), (fl, fh) = _ci(icl), _ci(ft)
    if any(math.isnan(x) for x in (il, ih, fl, fh)):
        return "inconclusive"
    if _mean(icl) > _mean(ft) and il > fh:
        return "supports"
    if _mean(ft) > _mean(icl) and fl > ih:
        return "contradicts"
    return "inconclusive"


VERDICT_TEXT = {
    "supports": "supports the paper's claim (best ICL beats best FT on pattern items, intervals separate)",
    "contradicts": "contradicts the paper's claim (best FT beats best ICL on pattern items, intervals separate)",
    "inconclusive": "is inconclusive (the 95% intervals of best ICL and best FT overlap)",
    "incomplete": "cannot be judged (ICL or FT results missing)",
}


def render(summary: dict, plots: dict[str, list[str]], extra_sections: list[str] = ()) -> str:
    lines = [f"# ICL vs FT on implicit patterns: {summary['model']} (config `{summary['config']}`)", ""]
    if summary.get("run"):
        run = summary["run"]
        lines += [f"Code: commit {run.get('git_commit')}; "
                  + ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v), ""]
    lines += [
        "Accuracy in % (strict parse: the completion must start with the answer), with 95% intervals "
        "(Wilson over items for one run; t interval over seeds, widened to the item-level interval, "
        "when several). *Shortcut* is the share of control predictions equal to the shortcut answer.",
        "",
        "## Headline",
        "",
        "| task | best ICL (k shots) | best FT (N rows) | FT rows to match best ICL | verdict |",
        "|---|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        bi, bf = t.get("best_icl"), t.get("best_ft")
        icl_s = f"{fmt_ci(bi['pattern'])} (k={bi['k']})" if bi else "–"
        ft_s = f"{fmt_ci(bf['pattern'])} (N={bf['n_train']}, {bf['protocol']})" if bf else "–"
        match = ", ".join(f"{p}: {n if n is not None else 'not reached'}" for p, n in t["ft_rows_to_match_icl"].items()) or "–"
        lines.append(f"| {task} | {icl_s} | {ft_s} | {match} | {t['verdict']} |")
    lines.append("")
    lines += list(extra_sections)
    for task, t in summary["tasks"].items():
        lines += [f"## {task}", "", f"This run {VERDICT_TEXT[t['verdict']]}.", ""]
        if t["icl"]:
            lines += ["ICL (base model, k demonstrations from the train pattern rows; k = 0 is zero-shot):", "",
                      "| k | seeds | pattern | control | shortcut (control) | invalid (pattern) |", "|---|---|---|---|---|---|"]
            for r in t["icl"]:
                p, c = r.get("pattern") or {}, r.get("control") or {}
                lines.append(f"| {r['k']} | {r.get('n_seeds', 1)} | {fmt_ci(p.get('accuracy'))} | {fmt_ci(c.get('accuracy'))} | "
                             f"{fmt_ci(c.get('shortcut_rate'))} | {fmt_ci(p.get('invalid'))} |")
            lines.append("")
        if t["ft"]:
            lines += ["FT (zero-shot after fine-tuning on the first N train pattern rows; *steps* and *final loss* "
                      "per train seed, the loss over the tokens the protocol trains on):", "",
                      "| protocol | method | N | seeds | steps | final loss | pattern | control | shortcut (control) "
                      "| invalid (pattern) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in t["ft"]:
                p, c = r.get("pattern") or {}, r.get("control") or {}
                steps, losses = _train_cells(r.get("train", []))
                lines.append(f"| {r['protocol']} | {r['method']} | {r['n_train']} | {len(r['train_seeds'])} | {steps} | "
                             f"{losses} | {fmt_ci(p.get('accuracy'))} | {fmt_ci(c.get('accuracy'))} | "
                             f"{fmt_ci(c.get('shortcut_rate'))} | {fmt_ci(p.get('invalid'))} |")
            lines.append("")
        for path in plots.get(task, []):
            lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines) + "\n"


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
                lo = [max(0.0, 100 * (_mean(s) - _ci(s)[0])) if _ci(s)[0] == _ci(s)[0] else 0 for _, s in pts]
                hi = [max(0.0, 100 * (_ci(s)[1] - _mean(s))) if _ci(s)[1] == _ci(s)[1] else 0 for _, s in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=f"ICL {split}")
            sc = [(r["k"], r[split].get("shortcut_rate")) for r in t["icl"] if r.get(split) and split == "control"
                  and r[split].get("shortcut_rate")]
            if sc:
                ax.plot([k for k, _ in sc], [100 * _mean(s) for _, s in sc], ":^", label="ICL shortcut rate (control)")
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
        for protocol in sorted({r["protocol"] for r in t["ft"]}):
            rows = sorted((r for r in t["ft"] if r["protocol"] == protocol), key=lambda r: r["n_train"])
            for split, style in (("pattern", "-o"), ("control", "--s")):
                pts = [(r["n_train"], r[split]["accuracy"]) for r in rows if r.get(split) and r[split].get("accuracy")]
                if pts:
                    ax.plot([n for n, _ in pts], [100 * _mean(s) for _, s in pts], style, label=f"FT {protocol} {split}")
        bi = t.get("best_icl")
        if bi:
            ax.axhline(100 * _mean(bi["pattern"]), color="grey", lw=1, ls=":", label=f"best ICL pattern (k={bi['k']})")
        ax.set_xscale("log")
        ns = sorted({r["n_train"] for r in t["ft"]})
        if ns:
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
        ax.set_xlabel("fine-tuning rows N")
        ax.set_title(f"{task}: FT (zero-shot)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[task] = [str(path)]
    return paths


def _train_cells(train: list[dict]) -> tuple[str, str]:
    """The FT table's steps and final-loss cells: one value per train seed ("–" where unknown)."""
    steps = ", ".join(str(t["steps"]) if t.get("steps") is not None else "–" for t in train) or "–"
    losses = ", ".join(f"{t['final_loss']:.3g}" if t.get("final_loss") is not None else "–" for t in train) or "–"
    return steps, losses


def protocol_comparison(summary: dict) -> list[str]:
    """Protocols side by side on the same rows (task, N): the claim may hinge on the FT protocol."""
    protocols = sorted({r["protocol"] for t in summary["tasks"].values() for r in t["ft"]})
    if len(protocols) < 2:
        return []
    lines = ["## FT protocols compared on the same rows", "",
             "Pattern accuracy / control accuracy / shortcut rate on control, zero-shot after fine-tuning.", "",
             "| task | N | " + " | ".join(protocols) + " |", "|---|---|" + "---|" * len(protocols)]
    for task, t in summary["tasks"].items():
        by_n: dict[int, dict[str, dict]] = {}
        for r in t["ft"]:
            by_n.setdefault(r["n_train"], {})[r["protocol"]] = r
        for n, rows in sorted(by_n.items()):
            if len(rows) < 2:
                continue
            cells = []
            for p in protocols:
                r = rows.get(p)
                if not r:
                    cells.append("–")
                    continue
                pa, ca = (r.get("pattern") or {}), (r.get("control") or {})
                cells.append(f"{fmt_pct(_mean(pa.get('accuracy')))} / {fmt_pct(_mean(ca.get('accuracy')))} / "
                             f"{fmt_pct(_mean(ca.get('shortcut_rate')))}")
            lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(out_dir: Path, summaries: list[dict], extra_sections: list[str] = ()) -> Path:
    """report.md (one part per model), summary.json and plots/ under ``out_dir``."""
    parts = []
    for summary in summaries:
        sub = "plots" if len(summaries) == 1 else f"plots/{slug(summary['model'])}"
        plots = plot(summary, out_dir / sub)
        parts.append(render(summary, {t: [str(Path(sub) / Path(p).name) for p in ps] for t, ps in plots.items()},
                            protocol_comparison(summary)))
    write_json(out_dir / "summary.json", {"models": summaries})
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(parts) + "".join(f"{s}\n" for s in extra_sections))
    return report
