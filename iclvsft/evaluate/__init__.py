"""Evaluation of a model (optionally with a fine-tuned adapter) on the test items: test.py's engine.

``cells`` (what is computed) -> ``evaluator`` (scoring with a loaded model) -> ``run`` (the folder,
resume, sharding) -> ``samples`` / ``tables`` (samples.jsonl, metrics.json, table.md). How and why:
docs/engine.md.
"""

from __future__ import annotations

from ..prompts import demo_order, per_item_demos
from .cells import Cell, TaskInputs, items_to_evaluate, max_new_tokens_for, plan_cells, select_items, task_inputs
from .evaluator import Evaluator, prompt_sha
from .run import RUN_FILE, SAMPLES_FILE, EvalPlan, evaluate, requested_identity
from .samples import append_rows, read_samples
from .tables import METRIC_NAMES, cell_metrics, render_table, summarise, write_metrics

__all__ = [
    "METRIC_NAMES",
    "RUN_FILE",
    "SAMPLES_FILE",
    "Cell",
    "EvalPlan",
    "Evaluator",
    "TaskInputs",
    "append_rows",
    "cell_metrics",
    "demo_order",
    "evaluate",
    "items_to_evaluate",
    "max_new_tokens_for",
    "per_item_demos",
    "plan_cells",
    "prompt_sha",
    "read_samples",
    "render_table",
    "requested_identity",
    "select_items",
    "summarise",
    "task_inputs",
    "write_metrics",
]
