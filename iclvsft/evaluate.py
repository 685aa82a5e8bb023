"""Evaluation of a model (optionally with a fine-tuned adapter) on the test items: test.py's engine.

A **cell** is one task x one condition: ``k`` demonstrations drawn with one demo seed (k = 0 is
zero-shot and runs once). Every item of a cell gets the same demonstrations (``demo_mode: shared``),
so the header + demonstrations prefix is run through the model once per cell and its KV cache is
reused by every batch (:mod:`iclvsft.engine`). ``demo_mode: per_item`` draws fresh demonstrations
for each item, the authors' protocol, on the plain uncached path.

Demonstrations come from the task's train pool (``eval.demo_split``, pattern by default). For a
demo seed, one permutation of the pool is drawn and k-shot uses its first k rows, so the demo sets
are nested across k (4-shot is a prefix of 16-shot): shot curves compare like with like.

Output folder (``--out``)::

    run.json       what identifies the run (model, adapter, dtype, data, protocol); a rerun with a
                   different identity into the same folder is refused
    samples.jsonl  one row per item x cell, appended in a fixed order as chunks complete
    metrics.json   accuracy per cell and split with 95% intervals, aggregated over demo seeds
    table.md       the same, for people

Resume: rows are written chunk by chunk, in item order; a rerun reads samples.jsonl, drops a
half-written last line, skips every (cell, item) already there and continues, so an interrupted
and resumed run ends with the same files as an uninterrupted one. Under ``accelerate launch`` each
chunk's items are split across processes and gathered on the main process, which alone writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from . import engine
from .data import load_items, load_manifest, normalise_question
from .errors import ConfigError, DataError
from .io import atomic_write_text, jsonl_line, provenance, write_json
from .metrics import fmt_ci, over_seeds, rate
from .prompts import build_prompt, completion_text, prefix
from .rng import item_rng
from .scoring import FORMATS, score
from .tasks import Item, Task, get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    task: str
    k: int
    demo_seed: int | None  # None for k = 0

    @property
    def key(self) -> str:
        return f"{self.task}/k={self.k}" + (f"/seed={self.demo_seed}" if self.demo_seed is not None else "")


def plan_cells(tasks: Sequence[str], shots: Sequence[int], demo_seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for task in tasks:
        for k in shots:
            if k == 0:
                cells.append(Cell(task, 0, None))
            else:
                cells.extend(Cell(task, k, s) for s in demo_seeds)
    return cells


def demo_order(pool: Sequence[Item], demo_seed: int, task: str, max_k: int) -> list[Item]:
    """The first ``max_k`` rows of a seeded permutation of ``pool``: k-shot takes the first k."""
    if max_k > len(pool):
        raise ConfigError(f"{task}: {max_k} demonstrations asked for, the train pool has {len(pool)}")
    order = list(range(len(pool)))
    item_rng(demo_seed, "demos", task).shuffle(order)
    return [pool[i] for i in order[:max_k]]


def per_item_demos(pool: Sequence[Item], demo_seed: int, task: str, k: int, item: Item) -> list[Item]:
    rng = item_rng(demo_seed, "demos", task, item.id)
    return [pool[i] for i in rng.sample(range(len(pool)), k)]


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def max_new_tokens_for(tokenizer, task: Task, answers: Sequence[str], margin: int = 2) -> int:
    """Enough tokens for the longest known answer plus its separator and end of line."""
    longest = max(len(tokenizer(completion_text(task, a), add_special_tokens=False)["input_ids"]) for a in answers)
    return longest + margin


class Evaluator:
    """Scores items of one task under one demonstration set with a loaded model."""

    def __init__(self, model, tokenizer, batch_size: int, constrained: bool = True):
        self.model, self.tokenizer, self.batch_size, self.constrained = model, tokenizer, batch_size, constrained
        self.fallbacks = 0  # items whose tokenization forced the uncached path

    def run(self, task: Task, items: Sequence[Item], demos: Sequence[Item], max_new_tokens: int,
            use_cache: bool = True) -> list[dict]:
        """Completions and scores for ``items``, all prompted with the same ``demos``."""
        prompts = [build_prompt(task, i.question, demos) for i in items]
        if use_cache:
            pre = engine.build_prefix(self.model, self.tokenizer, prefix(task, demos))
            suffixes = engine.split_suffixes(self.tokenizer, pre, [i.question for i in items])
        else:
            pre, suffixes = engine.empty_prefix(), [None] * len(items)
        # Rows whose joint tokenization crosses the prefix boundary (and every row without the
        # cache) take their whole prompt on the uncached path.
        uncached = [n for n, s in enumerate(suffixes) if s is None]
        rows = [s if s is not None else engine.encode(self.tokenizer, p) for s, p in zip(suffixes, prompts)]
        if use_cache:
            self.fallbacks += len(uncached)
        label_ids = self._one_token_labels(task, prompts) if self.constrained else None
        completions, first = self._generate(pre, rows, uncached, max_new_tokens, label_ids)
        if label_ids is not None:  # one-token labels: scored from the generation's own first step
            labels = [dict(zip(FORMATS[task.answer_format].labels, f)) for f in first]
        elif self.constrained:
            labels = self._labels(task, pre, items, prompts, rows, uncached)
        else:
            labels = [None] * len(items)
        return [self._row(task, i, p, c, lab) for i, p, c, lab in zip(items, prompts, completions, labels)]

    def _one_token_labels(self, task: Task, prompts: Sequence[str]) -> list[int] | None:
        """The token of each label when, after every prompt, each label (with its separator) is
        exactly one token, always the same one; else None (labels then get a forward pass each)."""
        labels = FORMATS[task.answer_format].labels
        if not labels:
            return None
        found: list[int] | None = None
        for prompt in prompts:
            n = len(engine.encode(self.tokenizer, prompt))
            conts = [engine.encode(self.tokenizer, prompt + task.answer_sep + label)[n:] for label in labels]
            ids = [c[0] for c in conts if len(c) == 1]
            if len(ids) != len(labels) or (found is not None and ids != found):
                return None
            found = ids
        return found

    def run_per_item(self, task: Task, items: Sequence[Item], demos_for: Callable[[Item], list[Item]],
                     max_new_tokens: int) -> list[dict]:
        """Each item with its own demonstrations (no shared prefix to cache)."""
        pre = engine.empty_prefix()
        prompts = [build_prompt(task, i.question, demos_for(i)) for i in items]
        rows = [engine.encode(self.tokenizer, p) for p in prompts]
        completions, _ = self._generate(pre, rows, [], max_new_tokens)
        labels = [None] * len(items)
        if self.constrained and FORMATS[task.answer_format].labels:
            labels = [self._label_scores(task, pre, [items[n]], [rows[n]], [prompts[n]])[0] for n in range(len(items))]
        return [self._row(task, i, p, c, lab) for i, p, c, lab in zip(items, prompts, completions, labels)]

    def _batches(self, indices: Sequence[int], rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Batches of similar length (less padding); results go back to item order by index."""
        order = sorted(indices, key=lambda n: (-len(rows[n]), n))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _generate(self, pre: engine.Prefix, rows, uncached: Sequence[int], max_new_tokens: int,
                  score_tokens: Sequence[int] | None = None) -> tuple[list[str], list[list[float]]]:
        completions: list[str] = [""] * len(rows)
        first: list[list[float]] = [[] for _ in rows]
        cached = [n for n in range(len(rows)) if n not in set(uncached)]
        for group, p in ((cached, pre), (list(uncached), engine.empty_prefix())):
            for batch in self._batches(group, rows):
                ids, scores = engine.decode(self.model, self.tokenizer, p, [rows[n] for n in batch], max_new_tokens,
                                            score_tokens or ())
                for j, n in enumerate(batch):
                    completions[n] = self.tokenizer.decode(ids[j], skip_special_tokens=True)
                    first[n] = scores[j]
        return completions, first

    def _labels(self, task, pre, items, prompts, rows, uncached) -> list[dict | None]:
        if not FORMATS[task.answer_format].labels:
            return [None] * len(items)
        out: list[dict | None] = [None] * len(items)
        cached = [n for n in range(len(items)) if n not in set(uncached)]
        for group, p in ((cached, pre), (list(uncached), engine.empty_prefix())):
            for batch in self._batches(group, rows):
                scores = self._label_scores(task, p, [items[n] for n in batch], [rows[n] for n in batch],
                                            [prompts[n] for n in batch])
                for n, s in zip(batch, scores):
                    out[n] = s
        return out

    def _label_scores(self, task, pre, items, rows, prompts) -> list[dict]:
        """log p(separator + label | prompt) for every label of a binary task."""
        labels = FORMATS[task.answer_format].labels
        seqs, n_scored = [], []
        for row, prompt in zip(rows, prompts):
            prompt_ids = engine.encode(self.tokenizer, prompt)
            for label in labels:
                full = engine.encode(self.tokenizer, prompt + task.answer_sep + label)
                if full[:len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                    raise DataError(f"{task.name}: the label {label!r} does not tokenize as a continuation of the prompt")
                cont = full[len(prompt_ids):]
                seqs.append(list(row) + cont)
                n_scored.append(len(cont))
        flat = engine.continuation_logprobs(self.model, self.tokenizer, pre, seqs, n_scored)
        return [dict(zip(labels, flat[i * len(labels):(i + 1) * len(labels)])) for i in range(len(items))]

    @staticmethod
    def _row(task: Task, item: Item, prompt: str, completion: str, label_logprobs: dict | None) -> dict:
        s = score(item, completion, task.answer_format)
        row = {
            "item_id": item.id, "split": item.split, "prompt_sha256": prompt_sha(prompt), "completion": completion,
            "answer": item.answer, "shortcut_answer": item.shortcut_answer,
            "strict": s.strict, "lenient": s.lenient, "correct": s.correct, "lenient_correct": s.lenient_correct,
            "invalid": s.invalid, "shortcut": s.shortcut if item.shortcut_answer is not None else None,
            "constrained": None, "constrained_correct": None, "constrained_shortcut": None, "label_logprobs": None,
        }
        if label_logprobs:
            choice = max(label_logprobs, key=lambda lab: (label_logprobs[lab], lab))
            row.update(constrained=choice, constrained_correct=choice == item.answer,
                       constrained_shortcut=choice == item.shortcut_answer if item.shortcut_answer is not None else None,
                       label_logprobs={k: round(v, 6) for k, v in label_logprobs.items()})
        return row


# --- the run folder ----------------------------------------------------------------------------

def read_samples(path: Path) -> list[dict]:
    """Rows of samples.jsonl; a half-written last line (an interrupted append) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("%s: dropping a half-written last line (interrupted run)", path)
        with path.open("r+b") as f:
            f.truncate(keep)
    rows = []
    for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: corrupt line; move the folder away and rerun") from None
    return rows


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(jsonl_line(r) for r in rows))
        f.flush()
        os.fsync(f.fileno())


def check_identity(out: Path, identity: dict) -> None:
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("identity")
        if old != identity:
            diff = sorted(k for k in set(old or {}) | set(identity) if (old or {}).get(k) != identity.get(k))
            raise ConfigError(f"{out} holds results of another run (differs in {', '.join(diff)}); "
                              "choose another --out or move that folder away")


@dataclass
class EvalPlan:
    config: dict
    data_dir: Path
    out: Path
    model_name: str
    adapter: str | None


def evaluate(plan: EvalPlan, loaded=None, show_progress: bool = True) -> dict:
    """Run (or resume) every cell of ``plan``; returns the metrics also written to ``plan.out``."""
    from accelerate import PartialState

    from .models import load_model

    import torch

    # On a machine without CUDA, cpu=True is what makes the processes of `accelerate launch` one job
    # (over gloo); without it each would run, and write, the whole evaluation on its own.
    state = PartialState(cpu=not torch.cuda.is_available())
    cfg, ev = plan.config, plan.config["eval"]
    tasks = ev["tasks"] or cfg["data"]["tasks"]
    if ev["demo_mode"] not in ("shared", "per_item"):
        raise ConfigError(f"eval.demo_mode must be shared or per_item, got {ev['demo_mode']!r}")
    if any(k < 0 for k in ev["shots"]) or ev["batch_size"] < 1:
        raise ConfigError("eval.shots must be >= 0 and eval.batch_size >= 1")
    manifest = load_manifest(plan.data_dir)
    out = plan.out
    samples_path = out / "samples.jsonl"
    cells = plan_cells(tasks, ev["shots"], ev["demo_seeds"])
    # What identifies the run before the model is loaded (the resolved dtype/attention join below).
    core = {
        "model": plan.model_name, "adapter": str(plan.adapter) if plan.adapter else None,
        "dtype_requested": cfg["dtype"], "attn_requested": cfg["attn_implementation"],
        "data_seed": manifest.get("seed"),
        "data_sha256": {t: manifest["tasks"][t]["files"]["test"]["sha256"] for t in tasks if t in manifest["tasks"]},
        "demo_mode": ev["demo_mode"], "demo_split": ev["demo_split"], "splits": ev["splits"], "limit": ev["limit"],
        "constrained": ev["constrained"], "max_new_tokens": ev["max_new_tokens"],
    }
    done = {(r["cell"], r["item_id"]) for r in read_samples(samples_path)} if samples_path.is_file() else set()
    recorded = json.loads((out / "run.json").read_text()).get("identity") if (out / "run.json").is_file() else None
    if recorded and {k: recorded.get(k) for k in core} == core:
        items_of = {t: test_items(plan.data_dir, t, cfg) for t in tasks}
        planned = {(c.key, i.id) for c in cells for i in items_of[c.task]}
        if planned <= done:  # nothing left to compute: no need to load the model
            if state.is_main_process:
                write_metrics(out, recorded, cells)
            state.wait_for_everyone()
            return json.loads((out / "metrics.json").read_text())
    if loaded is None:
        loaded = load_model(plan.model_name, dtype=cfg["dtype"], attn_implementation=cfg["attn_implementation"],
                            adapter=plan.adapter, device=str(state.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    identity = {**core, "dtype": str(loaded.info.get("dtype")), "attn_implementation": loaded.info.get("attn_implementation")}
    check_identity(out, identity)  # on every process, so a refusal stops them all
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", {"identity": identity, "config": cfg, "model_info": _jsonable(loaded.info),
                                      "processes": state.num_processes, "provenance": provenance(), "argv": sys.argv})
    state.wait_for_everyone()  # every process has read samples.jsonl before the main one appends to it

    evaluator = Evaluator(model, tokenizer, ev["batch_size"], ev["constrained"])
    chunk = ev["batch_size"] * state.num_processes * 2
    by_task: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not (show_progress and state.is_main_process))
    for cell in cells:
        bar.set_postfix_str(cell.key)
        if cell.task not in by_task:
            by_task[cell.task] = _task_inputs(plan.data_dir, cell.task, cfg, tokenizer)
        inp = by_task[cell.task]
        task, items = inp["task"], inp["items"]
        todo = [i for i in items if (cell.key, i.id) not in done]
        if todo:
            demos = demo_order(inp["demo_pool"], cell.demo_seed, cell.task, cell.k) if cell.k else []
            _check_demos(demos, inp["test_questions"], cell)
            for start in tqdm(range(0, len(todo), chunk), desc=cell.key, unit="chunk", leave=False,
                              disable=not (show_progress and state.is_main_process)):
                part = todo[start:start + chunk]
                with state.split_between_processes(part) as mine:
                    rows = _run_items(evaluator, task, mine, demos, cell, inp, ev)
                rows = _gather(state, rows)
                if state.is_main_process:
                    order = {i.id: n for n, i in enumerate(part)}
                    rows.sort(key=lambda r: order[r["item_id"]])
                    append_rows(samples_path, [{"cell": cell.key, "task": cell.task, "k": cell.k,
                                                "demo_seed": cell.demo_seed, **r} for r in rows])
                state.wait_for_everyone()
        if state.is_main_process:
            write_metrics(out, identity, cells)
        bar.update(1)
    bar.close()
    if evaluator.fallbacks:
        log.info("%d items used the uncached path (tokenization across the prefix boundary)", evaluator.fallbacks)
    state.wait_for_everyone()
    return json.loads((out / "metrics.json").read_text())


def _first(items: Sequence[Item], split: str, limit: int) -> list[Item]:
    part = [i for i in items if i.split == split]
    return part[:limit] if limit else part


def test_items(data_dir: Path, name: str, cfg: dict) -> list[Item]:
    """The items a run evaluates for one task: per split in eval.splits, the first eval.limit."""
    ev = cfg["eval"]
    task = get_task(name, cfg["data"]["task_params"].get(name))
    test = load_items(data_dir, name, "test")
    return [i for split in ev["splits"] if split in task.splits for i in _first(test, split, ev["limit"])]


def _task_inputs(data_dir: Path, name: str, cfg: dict, tokenizer) -> dict[str, Any]:
    ev = cfg["eval"]
    task = get_task(name, cfg["data"]["task_params"].get(name))
    test = load_items(data_dir, name, "test")
    items = [i for split in ev["splits"] if split in task.splits for i in _first(test, split, ev["limit"])]
    train = load_items(data_dir, name, "train")
    demo_pool = [i for i in train if i.split == ev["demo_split"]]
    max_new = ev["max_new_tokens"] or max_new_tokens_for(tokenizer, task, [i.answer for i in train])
    return {"task": task, "items": items, "demo_pool": demo_pool, "max_new_tokens": max_new,
            "test_questions": {normalise_question(i.question) for i in test}}


def _check_demos(demos: Sequence[Item], test_questions: set[str], cell: Cell) -> None:
    leaked = [d.id for d in demos if normalise_question(d.question) in test_questions]
    if leaked:
        raise DataError(f"{cell.key}: demonstrations {leaked[:3]} are test questions; regenerate the data")


def _run_items(evaluator: Evaluator, task: Task, items: list[Item], demos: list[Item], cell: Cell,
               inp: dict, ev: dict) -> list[dict]:
    if not items:
        return []
    if ev["demo_mode"] == "per_item" and cell.k:
        pool = inp["demo_pool"]
        test_q = inp["test_questions"]

        def demos_for(item: Item) -> list[Item]:
            d = per_item_demos(pool, cell.demo_seed, cell.task, cell.k, item)
            _check_demos(d, test_q, cell)
            return d

        return evaluator.run_per_item(task, items, demos_for, inp["max_new_tokens"])
    return evaluator.run(task, items, demos, inp["max_new_tokens"])


def _gather(state, rows: list[dict]) -> list[dict]:
    if state.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)


def _jsonable(info: dict) -> dict:
    return json.loads(json.dumps(info, default=str))


# --- metrics -----------------------------------------------------------------------------------

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
        "| task | k | seeds | pattern | control | shortcut (control) | invalid (pattern / control) | lenient (pattern / control) | constrained (pattern / control) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[tuple, dict] = {}
    for e in metrics["by_condition"]:
        table.setdefault((e["task"], e["k"]), {})[e["split"]] = e
    for (task, k), splits in table.items():
        p, c = splits.get("pattern", {}), splits.get("control", {})
        seeds = (p or c)["accuracy"].get("n_seeds", 1)

        def pair(name: str) -> str:
            return " / ".join(fmt_ci(s.get(name)) if s.get(name) else "–" for s in (p, c))

        lines.append(f"| {task} | {k} | {seeds} | {fmt_ci(p.get('accuracy'))} | {fmt_ci(c.get('accuracy'))} | "
                     f"{fmt_ci(c.get('shortcut_rate')) if c.get('shortcut_rate') else '–'} | {pair('invalid')} | "
                     f"{pair('lenient_accuracy')} | {pair('constrained_accuracy')} |")
    return "\n".join(lines) + "\n"
