"""The analysis: config -> results folder. Builds the pairs per task, runs every condition (base,
ICL, FT) over them, summarises the maps and shift into circuits.json and writes the results folder."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import load_items
from ..engine import build_prefix
from ..errors import ConfigError, DataError
from ..io import atomic_write_text, progress, provenance, write_json, write_jsonl
from ..models import load_model
from ..prompts import demo_order
from ..prompts import prefix as prompt_prefix
from ..tasks import Task, get_task
from ..writers import writing
from .hooks import anatomy
from .pairs import Pair, make_pairs, pair_inputs, tokenize_pair
from .patching import PatchResult, patch_pair
from .plots import plot_task
from .report import report_section
from .settings import check_circuit_settings
from .shift import agreement, bootstrap_shift, interval95, jsonable

log = logging.getLogger(__name__)


def adapter_for(config: Config, task: str) -> str | None:
    """The FT condition's fine-tuned folder for ``task`` (``{task}`` in circuits.adapter is replaced): a
    LoRA adapter (adapter_config.json) or a fully fine-tuned model (config.json)."""
    pattern = config.circuits.adapter
    if not pattern:
        return None
    path = pattern.replace("{task}", task)
    if not any((Path(path) / name).is_file() for name in ("adapter_config.json", "config.json")):
        raise ConfigError(f"circuits.adapter: {path} holds neither a LoRA adapter (adapter_config.json) nor a fully "
                          "fine-tuned model (config.json); finetune.py --out writes one of them")
    return path


def load_fine_tuned(config: Config, path: str, **load_kw):
    """The FT condition's model: the base with the adapter merged, or the fully fine-tuned model itself."""
    if (Path(path) / "adapter_config.json").is_file():
        return load_model(config.model, adapter=path, merge_adapter=True, **load_kw)
    return load_model(path, **load_kw)


@dataclass
class TaskState:
    """One task's pairs and demonstrations, and each condition's per-pair results as they are run."""

    task: Task
    pairs: list[Pair]
    demos: list
    skipped: dict[str, int]
    results: dict[str, list[PatchResult]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_condition(loaded, state: TaskState, cond: str, demos: Sequence, c: dict, show_progress: bool) -> None:
    """Patch every pair of ``state`` under condition ``cond`` (the model ``loaded``, prompts with
    ``demos``); the results go to ``state.results[cond]``."""
    model, tokenizer = loaded.model, loaded.tokenizer
    anat = anatomy(model)
    started = time.perf_counter()
    pre = build_prefix(model, tokenizer, prompt_prefix(state.task, demos))
    results = []
    for n, pair in enumerate(progress(state.pairs, desc=f"{state.task.name}/{cond}", unit="pair",
                                      disable=not show_progress)):
        tokens = tokenize_pair(tokenizer, state.task, pair, demos)
        if isinstance(tokens, str):
            raise DataError(f"{pair.item_id}: pair unusable under {cond} ({tokens}); was another tokenizer loaded?")
        method = c.method
        if method == "attribution" and n < c.activation_items:
            method = "both"
        results.append(patch_pair(model, anat, pair_inputs(tokens, pre), method, c.batch_size))
    state.results[cond] = results
    state.seconds[cond] = round(time.perf_counter() - started, 2)


def _maps(results: Sequence[PatchResult], kind: str) -> np.ndarray | None:
    maps = [getattr(r, kind) for r in results]
    if not maps or any(m is None for m in maps):
        return None
    return np.stack(maps)


def summarise_task(state: TaskState, c: dict, n_heads: int, labels: list[list[str]]) -> dict[str, Any]:
    """Everything circuits.json says about one task."""
    primary = "attribution" if c.method in ("attribution", "both") else "activation"
    out: dict[str, Any] = {"n_pairs": len(state.pairs), "skipped": state.skipped, "primary_method": primary,
                           "shots": c.shots, "demo_ids": [d.id for d in state.demos], "seconds": state.seconds,
                           "component_labels": labels, "conditions": {}}
    per_item = {}
    rng = np.random.default_rng(c.seed)
    for cond, results in state.results.items():
        m_clean = np.array([r.m_clean for r in results])
        m_corr = np.array([r.m_corrupt for r in results])
        effect = m_clean - m_corr
        idx = rng.integers(0, len(effect), size=(max(c.bootstrap, 1), len(effect)))
        maps = _maps(results, primary)
        per_item[cond] = maps
        entry: dict[str, Any] = {
            "logit_diff_clean": jsonable(float(m_clean.mean())), "logit_diff_corrupt": jsonable(float(m_corr.mean())),
            "effect": {"value": jsonable(float(effect.mean())), "ci95": jsonable(interval95(effect[idx].mean(1)))},
            "clean_prefers_clean_answer": jsonable(float((m_clean > 0).mean())),
            "corrupt_prefers_corrupt_answer": jsonable(float((m_corr < 0).mean())),
            "map": jsonable(maps.mean(0)),
            "map_normalised": jsonable(maps.mean(0) / effect.mean()) if effect.mean() != 0 else None,
        }
        att, act = _maps(results, "attribution"), _maps(results, "activation")
        if att is None and act is None:
            pass
        elif act is None or att is None:
            subset = [r for r in results if r.attribution is not None and r.activation is not None]
            if subset:
                entry["agreement"] = agreement(np.stack([r.attribution for r in subset]),
                                               np.stack([r.activation for r in subset]))
        else:
            entry["agreement"] = agreement(att, act)
        top = np.argsort(-np.abs(maps.mean(0)).reshape(-1), kind="stable")[:10]
        flat_labels = [x for row in labels for x in row]
        entry["top_components"] = [{"component": flat_labels[i], "effect": jsonable(float(maps.mean(0).reshape(-1)[i]))}
                                   for i in top]
        out["conditions"][cond] = entry
    if "base" in per_item and len(per_item) > 1:
        out["shift"] = bootstrap_shift(per_item, c.top_k, c.bootstrap, c.seed)
    return out


def _score_rows(name: str, state: TaskState) -> list[dict[str, Any]]:
    """scores.jsonl's rows for one task: one per condition x pair."""
    rows = []
    for cond, results in state.results.items():
        for pair, r in zip(state.pairs, results):
            rows.append({"task": name, "condition": cond, **pair.to_dict(), "logit_diff_clean": jsonable(r.m_clean),
                         "logit_diff_corrupt": jsonable(r.m_corrupt),
                         "attribution": jsonable(r.attribution) if r.attribution is not None else None,
                         "activation": jsonable(r.activation) if r.activation is not None else None})
    return rows


def analyze(config: Config, data_dir: str | Path, out: str | Path, show_progress: bool = True,
            argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the circuit analysis for ``config`` (its ``circuits`` section, ``model``, ``dtype``) on the
    generated data in ``data_dir``; write the results folder ``out`` (holding its writer lock) and return
    circuits.json's content. A finished folder made with other settings is refused (analyze_circuits.py
    --overwrite clears it first)."""
    out = Path(out)
    with writing(out):
        if (out / "circuits.json").is_file():
            check_circuit_settings(out, config, derived_adapter=False, remedies=("overwrite_start", "another_out"))
        return _analyze(config, data_dir, out, show_progress, argv)


def _analyze(config: Config, data_dir: str | Path, out: Path, show_progress: bool,
             argv: Sequence[str] | None) -> dict[str, Any]:
    c = config.circuits
    started = time.perf_counter()
    write_json(out / "config.json", {"config": config.to_dict(), "provenance": provenance(), "argv": list(argv or []),
                                     "data": str(data_dir)})
    adapters = {t: adapter_for(config, t) for t in c.tasks}  # fail early on a missing adapter
    load_kw = dict(dtype=c.dtype or config.dtype, attn_implementation=config.attn_implementation,
                   show_progress=show_progress)
    base = load_model(config.model, **load_kw)
    states: dict[str, TaskState] = {}
    for name in c.tasks:
        task = get_task(name, config.data.task_params.get(name))
        items = load_items(data_dir, name, "test", split=c.split)
        if not items:
            raise DataError(f"{data_dir}/{name}/test.jsonl has no {c.split} items")
        pool = load_items(data_dir, name, "train", split=config.eval.demo_split)
        demos = demo_order(pool, c.demo_seed, name, c.shots)
        pairs, skipped = make_pairs(task, items, base.tokenizer, [[], demos], c.n_items, c.corruption, c.seed)
        if len(pairs) < 2:
            raise DataError(f"{name}: only {len(pairs)} usable clean/corrupted pairs among {len(items)} items "
                            f"(skipped: {skipped})")
        if len(pairs) < c.n_items:
            log.warning("%s: %d pairs (asked for %d): too few items with a usable twin", name, len(pairs), c.n_items)
        states[name] = state = TaskState(task, pairs, demos, skipped)
        run_condition(base, state, "base", [], c, show_progress)
        run_condition(base, state, "icl", demos, c, show_progress)
    anat = anatomy(base.model)
    n_layers, n_heads, labels = anat.n_layers, anat.n_heads, anat.labels()
    model_info = {"base": base.info}
    del base, anat  # free the base model before loading the fine-tuned one
    for name, state in states.items():
        if adapters[name] is None:
            continue
        ft = load_fine_tuned(config, adapters[name], **load_kw)
        model_info[f"ft/{name}"] = ft.info
        run_condition(ft, state, "ft", [], c, show_progress)
        del ft

    rows, tasks_out, plots = [], {}, {}
    for name, state in states.items():
        summary = summarise_task(state, c, n_heads, labels)
        summary["adapter"] = adapters[name]
        tasks_out[name] = summary
        mean_maps = {cond: np.array(e["map"], dtype=float) for cond, e in summary["conditions"].items()}
        written = plot_task(name, mean_maps, out / "plots" / name, n_heads, summary["primary_method"])
        plots[name] = {k: Path(v).relative_to(out).as_posix() for k, v in written.items()}
        rows += _score_rows(name, state)
    result = {
        "model": config.model, "models": model_info, "method": c.method, "corruption": c.corruption,
        "split": c.split, "grid": {"layers": n_layers, "heads": n_heads, "columns": "heads 0..H-1, then MLP"},
        "tasks": tasks_out, "plots": plots, "wall_seconds": round(time.perf_counter() - started, 1),
        "provenance": provenance(),
    }
    write_jsonl(out / "scores.jsonl", rows)
    write_json(out / "circuits.json", result)
    atomic_write_text(out / "circuits.md", report_section(result))
    return result
