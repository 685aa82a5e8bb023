"""An evaluation folder's numbers: metrics per cell and split, aggregated over demo seeds, as
metrics.json and table.md."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, provenance, write_json
from ..metrics import fmt_ci, rate, seed_item_interval
from .cells import Cell
from .samples import read_samples

# metric name -> the per-row field it averages (None rows are not scored for that metric)
METRIC_FIELDS = {"accuracy": "correct", "lenient_accuracy": "lenient_correct", "invalid": "invalid",
                 "shortcut_rate": "shortcut", "constrained_accuracy": "constrained_correct",
                 "constrained_shortcut_rate": "constrained_shortcut", "substring_accuracy": "substring_correct",
                 "substring_shortcut_rate": "substring_shortcut"}
METRIC_NAMES = tuple(METRIC_FIELDS)


def cell_metrics(rows: Sequence[dict]) -> dict:
    """Accuracy (strict), lenient accuracy, invalid and shortcut rates, constrained accuracy."""
    out: dict[str, Any] = {"n": len(rows)}
    for name, field in METRIC_FIELDS.items():
        flags = [r.get(field) for r in rows if r.get(field) is not None]
        out[name] = rate(flags) if flags or name in ("accuracy", "lenient_accuracy", "invalid") else None
    return out


def aligned(cells: Sequence[Sequence[dict]], field: str) -> tuple[list[str], list[list[float]]]:
    """The item ids and the (cells x items) matrix of ``field`` for cells scored on the same items,
    aligned by item id in the first cell's order (items some cell lacks, or where the field is None,
    are left out)."""
    by_cell = [{r["item_id"]: r.get(field) for r in rows} for rows in cells]
    ids = [i for i in by_cell[0] if all(c.get(i) is not None for c in by_cell)]
    return ids, [[float(c[i]) for i in ids] for c in by_cell]


def split_metrics(seeds: Sequence[Sequence[dict]]) -> dict[str, dict | None]:
    """Every metric of one split over seeds scored on the same items (one list of rows per seed): the
    mean and a 95% interval combining item and seed variance, None where no row has the field."""
    out: dict[str, dict | None] = {}
    for name, field in METRIC_FIELDS.items():
        ids, matrix = aligned(seeds, field)
        out[name] = seed_item_interval(matrix) if ids else None
    return out


def summarise(rows: Sequence[dict]) -> dict:
    """Per cell and split, then per (task, k, split) over demo seeds: the mean and a 95% interval that
    combines item and seed variance (:func:`iclvsft.metrics.seed_item_interval`)."""
    cells: dict[str, dict] = {}
    for r in rows:
        c = cells.setdefault(r["cell"], {"task": r["task"], "k": r["k"], "demo_seed": r["demo_seed"], "rows": {}})
        c["rows"].setdefault(r["split"], []).append(r)
    per_cell = {key: {"task": c["task"], "k": c["k"], "demo_seed": c["demo_seed"],
                      "splits": {s: cell_metrics(rs) for s, rs in sorted(c["rows"].items())}}
                for key, c in cells.items()}
    grouped: dict[tuple, list[list[dict]]] = {}
    for c in cells.values():
        for split, rs in c["rows"].items():
            grouped.setdefault((c["task"], c["k"], split), []).append(rs)
    per_k = []
    for (task, k, split), seeds in sorted(grouped.items()):
        per_k.append({"task": task, "k": k, "split": split, "n_items": len(seeds[0]), **split_metrics(seeds)})
    return {"cells": per_cell, "by_condition": per_k}


def write_metrics(out: Path, identity: dict, cells: Sequence[Cell]) -> dict:
    """metrics.json and table.md over every cell the folder holds: runs into one folder add up (a run
    with other shots or tasks adds its cells, never drops earlier ones); ``requested`` lists the
    cells of the latest run (``cells``). The study's report picks its own cells from these."""
    rows = read_samples(out / "samples.jsonl")
    summary = summarise(rows)
    metrics = {"identity": identity, "provenance": provenance(), "requested": sorted(c.key for c in cells), **summary}
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "table.md", render_table(metrics))
    return metrics


def render_table(metrics: dict) -> str:
    ident = metrics["identity"]
    prov = metrics["provenance"]
    lines = [
        f"# Evaluation: {ident['model']}" + (f" + adapter {ident['adapter']}" if ident["adapter"] else ""),
        "",
        f"prompt format {ident.get('format', 'ours')}, prompt style {ident.get('prompt_style', 'raw')}, "
        f"dtype {ident['dtype']}, attention {ident['attn_implementation']}, data seed {ident['data_seed']}, "
        f"demo mode {ident['demo_mode']}, commit {prov.get('git_commit')}, "
        + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if k in ("torch", "transformers", "peft")),
        "",
        "Accuracy in % (strict parse). Brackets: 95% interval (Wilson over items for one cell; a bootstrap over",
        "demo seeds, then items, when several). Shortcut: share of control predictions equal to the shortcut",
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
