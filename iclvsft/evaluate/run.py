"""One evaluation folder (test.py): plan the cells, check the folder holds this run, load the model
only when something is left to compute, run the cells chunk by chunk (sharded under
``accelerate launch``), and keep metrics.json / table.md current. The folder's writer lock
(:mod:`iclvsft.writers`) is held throughout: one process writes a folder at a time."""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from ..config import Config
from ..data import load_manifest
from ..errors import ConfigError, DataError
from ..io import progress, provenance, write_json
from ..models import load_model, weights_identity
from ..prompts import demo_order, per_item_demos
from ..runs import compare_identity, read_identity, summarise_differences
from ..writers import writing
from .cells import Cell, TaskInputs, items_to_evaluate, plan_cells, task_inputs
from .evaluator import Evaluator
from .samples import append_rows, new_rows, read_samples, row_key
from .tables import write_metrics

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PER_TASK = ("data_sha256", "train_sha256")  # identity keys compared per task (runs of other tasks add up)
SAMPLES_FILE = "samples.jsonl"


@dataclass
class EvalPlan:
    config: Config
    data_dir: Path
    out: Path
    model_name: str
    adapter: str | None


def evaluate(plan: EvalPlan, loaded=None, show_progress: bool = True) -> dict:
    """Run (or resume) every cell of ``plan``, holding ``plan.out``'s writer lock; returns the metrics
    also written to ``plan.out``."""
    # On a machine without CUDA, cpu=True is what makes the processes of `accelerate launch` one job
    # (over gloo); without it each would run, and write, the whole evaluation on its own.
    state = PartialState(cpu=not torch.cuda.is_available())
    with writing(plan.out, state):  # refuses a file, and a folder another process is writing
        return _evaluate(plan, loaded, show_progress, state)


def _evaluate(plan: EvalPlan, loaded, show_progress: bool, state: PartialState) -> dict:
    ev = plan.config.eval
    tasks = plan.config.eval_tasks
    cells = plan_cells(tasks, ev.shots, ev.demo_seeds)
    core = requested_identity(plan, tasks)
    for task in tasks:
        if not items_to_evaluate(plan.data_dir, task, plan.config):
            raise DataError(f"{plan.data_dir}/{task}/test.jsonl holds no test items of splits {ev.splits}; "
                            "regenerate the data with data.test_pattern / data.test_control > 0")
    samples = plan.out / SAMPLES_FILE
    done = {row_key(r) for r in read_samples(samples)}
    if _nothing_left(plan, core, cells, done, tasks):  # no need to load the model
        if state.is_main_process:
            write_metrics(plan.out, json.loads((plan.out / RUN_FILE).read_text())["identity"], cells)
        state.wait_for_everyone()
        return json.loads((plan.out / "metrics.json").read_text())
    if loaded is None:
        loaded = load_model(plan.model_name, dtype=plan.config.dtype,
                            attn_implementation=plan.config.attn_implementation, adapter=plan.adapter,
                            device=str(state.device), show_progress=show_progress and state.is_main_process)
    loaded.model.eval()
    identity = {**core, "dtype": str(loaded.info.get("dtype")),
                "attn_implementation": loaded.info.get("attn_implementation")}
    identity = _claim_folder(plan, identity, loaded, state)
    _run_cells(plan, cells, done, identity, Evaluator(loaded.model, loaded.tokenizer, ev.batch_size,
                                                      ev.constrained), state, show_progress)
    return json.loads((plan.out / "metrics.json").read_text())


def requested_identity(plan: EvalPlan, tasks: list[str]) -> dict[str, Any]:
    """What identifies the run before the model is loaded (the resolved dtype/attention join later):
    the weights by content (an adapter retrained in place is another run), the test file and the
    train pool the demonstrations come from by sha256, the generators' version, every eval setting."""
    cfg, ev = plan.config, plan.config.eval
    manifest = load_manifest(plan.data_dir)
    files = {t: manifest["tasks"][t]["files"] for t in tasks if t in manifest["tasks"]}
    return {
        "model": plan.model_name, "adapter": str(plan.adapter) if plan.adapter else None,
        "model_sha256": weights_identity(plan.model_name),
        "adapter_sha256": weights_identity(str(plan.adapter)) if plan.adapter else None,
        "generator": manifest.get("generator"),
        "train_sha256": {t: f["train"]["sha256"] for t, f in files.items()},
        "dtype_requested": cfg.dtype, "attn_requested": cfg.attn_implementation, "format": cfg.prompt_format,
        "prompt_style": cfg.prompt_style,
        "data_seed": manifest.get("seed"),
        "data_sha256": {t: f["test"]["sha256"] for t, f in files.items()},
        "demo_mode": ev.demo_mode, "demo_split": ev.demo_split, "splits": ev.splits, "limit": ev.limit,
        "constrained": ev.constrained, "max_new_tokens": ev.max_new_tokens,
    }


def _nothing_left(plan: EvalPlan, core: dict, cells: list[Cell], done: set, tasks: list[str]) -> bool:
    """True when the folder holds this run and every planned (cell, item) row."""
    if compare_identity(plan.out / RUN_FILE, core, keys=core, per_task=PER_TASK) != []:
        return False
    items_of = {t: items_to_evaluate(plan.data_dir, t, plan.config) for t in tasks}
    return {(c.key, i.id) for c in cells for i in items_of[c.task]} <= done


def _claim_folder(plan: EvalPlan, identity: dict, loaded, state) -> dict:
    """Refuse a folder holding another run (on every process, so a refusal stops them all); write
    run.json with the identity, its per-task hashes covering every task evaluated there so far."""
    remedies = ("another_out", "move_folder")
    diff = compare_identity(plan.out / RUN_FILE, identity, remedies=remedies, per_task=PER_TASK)
    if diff:
        raise ConfigError(f"{plan.out} holds results of another run (differs in {summarise_differences(diff)})",
                          *remedies)
    saved = read_identity(plan.out / RUN_FILE) or {}
    identity = {**identity, **{k: {**(saved.get(k) or {}), **identity[k]} for k in PER_TASK}}  # every task so far
    if state.is_main_process:
        plan.out.mkdir(parents=True, exist_ok=True)
        write_json(plan.out / RUN_FILE, {"identity": identity, "config": plan.config.to_dict(),
                                          "model_info": json.loads(json.dumps(loaded.info, default=str)),
                                          "processes": state.num_processes, "provenance": provenance(),
                                          "argv": sys.argv})
    state.wait_for_everyone()  # every process has read samples.jsonl before the main one appends to it
    return identity


def _run_cells(plan: EvalPlan, cells: list[Cell], done: set, identity: dict, evaluator: Evaluator, state,
               show_progress: bool) -> None:
    ev = plan.config.eval
    chunk = ev.batch_size * state.num_processes * 2
    quiet = not (show_progress and state.is_main_process)
    by_task: dict[str, TaskInputs] = {}
    bar = progress(total=len(cells), desc="cells", unit="cell", disable=quiet)
    for cell in cells:
        bar.set_postfix_str(cell.key)
        if cell.task not in by_task:
            by_task[cell.task] = task_inputs(plan.data_dir, cell.task, plan.config, evaluator.tokenizer)
        inp = by_task[cell.task]
        todo = [i for i in inp.items if (cell.key, i.id) not in done]
        if todo:
            demos = demo_order(inp.demo_pool, cell.demo_seed, cell.task, cell.k) if cell.k else []
            inp.check_demos(demos, cell)
            for start in progress(range(0, len(todo), chunk), desc=cell.key, unit="chunk", leave=False, disable=quiet,
                                  nested=True):
                part = todo[start:start + chunk]
                with state.split_between_processes(part) as mine:
                    rows = _score(evaluator, inp, mine, demos, cell, ev.demo_mode)
                rows = gather_object(rows) if state.num_processes > 1 else rows
                if state.is_main_process:
                    order = {i.id: n for n, i in enumerate(part)}
                    rows.sort(key=lambda r: order[r["item_id"]])
                    append_rows(plan.out / SAMPLES_FILE, new_rows([{"cell": cell.key, "task": cell.task, "k": cell.k,
                                                                    "demo_seed": cell.demo_seed, **r} for r in rows],
                                                                  done))
                state.wait_for_everyone()
        if state.is_main_process:
            write_metrics(plan.out, identity, cells)
        bar.update(1)
    bar.close()
    if evaluator.fallbacks:
        log.info("%d items used the uncached path (tokenization across the prefix boundary)", evaluator.fallbacks)
    state.wait_for_everyone()


def _score(evaluator: Evaluator, inp: TaskInputs, items: list, demos: list, cell: Cell, demo_mode: str) -> list[dict]:
    if not items:
        return []
    if demo_mode == "per_item" and cell.k:
        def demos_for(item):
            d = per_item_demos(inp.demo_pool, cell.demo_seed, cell.task, cell.k, item)
            inp.check_demos(d, cell)
            return d

        return evaluator.run_per_item(inp.task, items, demos_for, inp.max_new_tokens)
    return evaluator.run(inp.task, items, demos, inp.max_new_tokens)
