"""An evaluation folder's numbers: metrics per cell and split, aggregated over demo seeds, as
metrics.json and table.md."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, provenance, write_json
from ..metrics import fmt_ci, over_seeds, rate
from .cells import Cell
from .samples import read_samples


def cell_metrics(rows: Sequence[dict]) -> dict:
    """Accuracy (strict), lenient accuracy, invalid and shortcut rates, constrained accuracy."""
    shortcut_rows = [r["shortcut"] for r in rows if r["shortcut"] is not None]
    constrained = [r["constrained_correct"] for r in rows if r["constrained_correct"] is not None]
    constrained_sc = [r["constrained_shortcut"] for r in rows if r.get("constrained_shortcut") is not None]
    return {
        "n": len(rows),
        "accuracy": rate([r["correct"] for r in rows]),
        "lenient_accuracy": rate([r["lenient_correct"] for r in rows]),
        "invalid": rate([r["invalid"] for r in rows]),
        "shortcut_rate": rate(shortcut_rows) if shortcut_rows else None,
        "constrained_accuracy": rate(constrained) if constrained else None,
        "constrained_shortcut_rate": rate(constrained_sc) if constrained_sc else None,
    }


METRIC_NAMES = ("accuracy", "lenient_accuracy", "invalid", "shortcut_rate", "constrained_accuracy",
                "constrained_shortcut_rate")


def summarise(rows: Sequence[dict]) -> dict:
    """Per cell and split, then per (task, k, split) over demo seeds."""
    cells: dict[str, dict] = {}
    for r in rows:
        c = cells.setdefault(r["cell"], {"task": r["task"], "k": r["k"], "demo_seed": r["demo_seed"], "rows": {}})
        c["rows"].setdefault(r["split"], []).append(r)
    per_cell = {key: {"task": c["task"], "k": c["k"], "demo_seed": c["demo_seed"],
                      "splits": {s: cell_metrics(rs) for s, rs in sorted(c["rows"].items())}}
                for key, c in cells.items()}
    grouped: dict[tuple, list[dict]] = {}
    for c in per_cell.values():
        for split, m in c["splits"].items():
            grouped.setdefault((c["task"], c["k"], split), []).append(m)
    per_k = []
    for (task, k, split), ms in sorted(grouped.items()):
        entry: dict[str, Any] = {"task": task, "k": k, "split": split, "n_items": ms[0]["n"]}
        for name in METRIC_NAMES:
            vals = [m[name]["mean"] for m in ms if m[name] is not None]
            if not vals:
                entry[name] = None
            elif len(ms) == 1:
                entry[name] = {**ms[0][name], "n_seeds": 1}
            else:
                entry[name] = over_seeds(vals, n_items=ms[0][name]["n"])
        per_k.append(entry)
    return {"cells": per_cell, "by_condition": per_k}


def write_metrics(out: Path, identity: dict, cells: Sequence[Cell]) -> dict:
    """metrics.json and table.md from the rows of the planned ``cells`` (rows of cells that an
    earlier run of the folder planned, e.g. with more demo seeds, stay in samples.jsonl but do not
    count)."""
    keys = {c.key for c in cells}
    rows = [r for r in read_samples(out / "samples.jsonl") if r["cell"] in keys]
    summary = summarise(rows)
    metrics = {"identity": identity, "provenance": provenance(), **summary}
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "table.md", render_table(metrics))
    return metrics


def render_table(metrics: dict) -> str:
    ident = metrics["identity"]
    prov = metrics["provenance"]
    lines = [
        f"# Evaluation: {ident['model']}" + (f" + adapter {ident['adapter']}" if ident["adapter"] else ""),
        "",
        f"dtype {ident['dtype']}, attention {ident['attn_implementation']}, data seed {ident['data_seed']}, "
        f"demo mode {ident['demo_mode']}, commit {prov.get('git_commit')}, "
        + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if k in ("torch", "transformers", "peft")),
        "",
        "Accuracy in % (strict parse). Brackets: 95% interval (Wilson over items for one cell; t interval of",
        "the mean over demo seeds when several). Shortcut: share of control predictions equal to the shortcut",
        "answer. Constrained: the label preferred by log-probability (binary tasks).",
        "",
        "| task | k | seeds | pattern | control | shortcut (control) | invalid (pattern / control) "
        "| lenient (pattern / control) | constrained (pattern / control) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[tuple, dict] = {}
    for e in metrics["by_condition"]:
        table.setdefault((e["task"], e["k"]), {})[e["split"]] = e
    for (task, k), splits in table.items():
        p, c = splits.get("pattern", {}), splits.get("control", {})
        seeds = (p or c)["accuracy"].get("n_seeds", 1)

        def pair(name: str, p=p, c=c) -> str:
            return " / ".join(fmt_ci(s.get(name)) if s.get(name) else "–" for s in (p, c))

        lines.append(f"| {task} | {k} | {seeds} | {fmt_ci(p.get('accuracy'))} | {fmt_ci(c.get('accuracy'))} | "
                     f"{fmt_ci(c.get('shortcut_rate')) if c.get('shortcut_rate') else '–'} | {pair('invalid')} | "
                     f"{pair('lenient_accuracy')} | {pair('constrained_accuracy')} |")
    return "\n".join(lines) + "\n"
