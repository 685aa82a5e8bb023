"""Export the benchmark as lm-evaluation-harness task configs, so any lm-eval backend runs it.

For each cell of the config's evaluation (task x k x demo seed; k = 0 once), this writes an lm-eval
task (``<cell>.yaml``) and its items (``<cell>.jsonl``), one group per task and the group
``iclvsft`` over all of them, ``utils.py`` (the hooks the YAMLs name) and ``export.json`` (what was
exported, from which data, with which demonstrations and token budgets), all in one folder that
``lm_eval --include_path`` reads::

    iclvsft export-lm-eval --config cpu --out lm_eval_tasks      # = python -m iclvsft.lm_eval_export
    lm_eval --model hf --model_args pretrained=Qwen/Qwen2.5-Coder-0.5B-Instruct,dtype=bfloat16 \\
        --include_path lm_eval_tasks --tasks iclvsft --batch_size 16 --log_samples --output_path lm_eval_out
    # vLLM, tensor and data parallel (not run here: no GPU and no vLLM on the CPU machines):
    lm_eval --model vllm --model_args pretrained=Qwen/Qwen2.5-Coder-0.5B-Instruct,tensor_parallel_size=2,data_parallel_size=4 \\
        --include_path lm_eval_tasks --tasks iclvsft --batch_size auto --log_samples --output_path lm_eval_out

``--tasks iclvsft_expression`` runs one task's cells, ``--tasks iclvsft_expression_k16_seed0`` one
cell. For an offline model name (``qwen2.5-coder-0.5b-instruct``) pass its prepared folder as
``pretrained`` (``python -m iclvsft.models NAME`` prepares it; this command prints the path).

What makes lm-eval's predictions test.py's (``tests/test_lm_eval.py`` checks it item by item):

* **The prompt.** Each row holds test.py's whole prompt, built by :func:`iclvsft.prompts.build_prompt`
  with the same demonstrations (:func:`~iclvsft.prompts.demo_order`: nested across k, shared by the
  cell; ``eval.demo_mode: per_item`` gives each row its own) in the config's ``format``;
  ``doc_to_text`` is that field and ``num_fewshot`` is 0. ``prompt_sha256`` is test.py's hash of it.
* **Decoding.** Greedy (``do_sample: false``, temperature 0, ``repetition_penalty: 1.0`` so that a
  model's own generation_config cannot add one), ``max_gen_toks`` = test.py's budget for the task
  (the longest train answer in the model's tokens + 2, or the format's fixed budget), which depends
  on the tokenizer: ``--model`` names the model whose tokenizer counts it.
* **The first line.** test.py stops at the end of the first non-empty line and scores it. lm-eval's
  ``until: ["\\n"]`` would cut a completion that starts with a newline to "" (test.py reads on to the
  next line), so generation stops at end of sequence or the budget (a few tokens) and the filter
  ``first_line`` keeps what test.py keeps: the first line after leading whitespace.
* **Scoring.** ``process_results`` scores that line with :func:`iclvsft.scoring.score`, so lm-eval
  reports our numbers: ``accuracy`` (strict), ``lenient_accuracy``, ``invalid``, per split
  ``pattern_accuracy`` / ``control_accuracy``, and ``control_shortcut_rate`` (control items whose
  strict answer is the shortcut's). Every row returns every metric (None where one does not apply:
  ``pattern_accuracy`` of a control row), so all are scored on the same documents; the per-split
  ones average the rows they apply to (:func:`mean_of_scored`, no stderr).
* **Prompt style.** ``prompt_style: chat`` renders each prompt with the model's own tokenizer's chat
  template, as test.py does: the rows hold the rendered text, so run lm-eval without
  ``--apply_chat_template``.
* **Order.** A cell's rows alternate pattern and control items, so lm-eval's ``--limit N`` (its first
  N rows) holds both splits. The hooks import ``iclvsft``: install it where lm-eval runs
  (``pip install -e .``); otherwise they fall back to the checkout that wrote the export.

Each row keeps ``id``, ``split``, ``cell``, ``answer`` and ``shortcut_answer``, so lm-eval's
``--log_samples`` rows (``doc``) join back to test.py's samples.jsonl on (``cell``, ``item_id``);
:func:`read_lm_eval_samples` reads them. lm-eval's HF backend (checked by the test) and, by its code,
its vLLM backend tokenize the prompt with the tokenizer's default special tokens, as test.py does
(a BOS token where the tokenizer adds one); leave ``add_bos_token`` unset. For identical predictions
give lm-eval the weights test.py evaluated (for an offline name, its prepared folder, not the hub
original).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from . import __version__, cli
from .commands import _parse, default_data_dir
from .commands import _parser as command_parser
from .config import Config, derive
from .errors import ConfigError, DataError, IclvsftError
from .io import atomic_write_text, dumps_json, jsonl_line, sha256_file
from .prompts import build_prompt, demo_order, per_item_demos
from .scoring import FORMATS, score
from .tasks import Item
from .writers import check_folder

GROUP = "iclvsft"
UTILS_FILE = "utils.py"
EXPORT_FILE = "export.json"
FILTER = "first_line"  # lm-eval names each metric "<metric>,<filter>"
METRICS = ("accuracy", "lenient_accuracy", "invalid", "pattern_accuracy", "control_accuracy",
           "control_shortcut_rate")
LOWER_IS_BETTER = {"invalid", "control_shortcut_rate"}
EVERY_ROW = {"accuracy", "lenient_accuracy", "invalid"}  # the others apply to one split's rows (mean_of_scored)

# The hooks lm-eval imports from beside the YAMLs (``!function utils.NAME``): thin wrappers, the logic
# lives here. ``Path(__file__)`` keeps the folder relocatable (the rows are read from beside it).
UTILS_PY = '''"""lm-eval hooks of an iclvsft export (written by iclvsft.lm_eval_export; regenerate, do not edit)."""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    from iclvsft import lm_eval_export as _export
except ImportError:  # iclvsft not installed where lm-eval runs: the checkout that wrote this export
    sys.path.insert(0, json.loads((HERE / "export.json").read_text())["repo_root"])
    from iclvsft import lm_eval_export as _export


def load_docs(data_file, **_):
    return _export.load_docs(HERE / data_file)


def first_line(resps, docs):
    return _export.first_line_filter(resps, docs)


def process_results(doc, results):
    return _export.process_results(doc, results)


def mean_of_scored(values):
    return _export.mean_of_scored(values)
'''


# ------------------------------------------------------------------------------ lm-eval's hooks

def load_docs(path: str | Path) -> dict:
    """A cell's rows as lm-eval's dataset: ``{"test": datasets.Dataset}``."""
    import datasets

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def first_line(completion: str) -> str:
    """What test.py's greedy decoding keeps and scores: the first line after leading whitespace."""
    return completion.lstrip().split("\n", 1)[0]


def first_line_filter(resps: Iterable[Sequence[str]], docs: Iterable[dict]) -> list[list[str]]:
    """lm-eval filter: every response of every doc cut to :func:`first_line`."""
    return [[first_line(r) for r in rs] for rs in resps]


def process_results(doc: dict, results: Sequence[str]) -> dict[str, float | None]:
    """Our strict/lenient scores of one row: every metric of :data:`METRICS` for every row, so lm-eval
    scores all of them on the same documents; a metric that does not apply to the row (``pattern_accuracy``
    of a control item, ``control_shortcut_rate`` where no shortcut exists) is None, which
    :func:`mean_of_scored` leaves out."""
    item = Item(id=doc["id"], task=doc["task"], split=doc["split"], question=doc["question"], answer=doc["answer"],
                shortcut_answer=doc["shortcut_answer"])
    s = score(item, results[0], doc["answer_format"])
    shortcut = doc["split"] == "control" and doc["shortcut_answer"] is not None
    return {"accuracy": float(s.correct), "lenient_accuracy": float(s.lenient_correct), "invalid": float(s.invalid),
            "pattern_accuracy": float(s.correct) if doc["split"] == "pattern" else None,
            "control_accuracy": float(s.correct) if doc["split"] == "control" else None,
            "control_shortcut_rate": float(s.shortcut) if shortcut else None}


def mean_of_scored(values: Sequence[float | None]) -> float | None:
    """lm-eval aggregation of a metric that applies to some rows only: the mean over the rows it applies
    to (None when none of the evaluated rows does, e.g. --limit 1)."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def mixed(items: Sequence[Item]) -> list[Item]:
    """``items`` with the splits interleaved (pattern, control, pattern, ...; each split in its own order),
    so that lm-eval's ``--limit N`` (the first N rows) gives both splits."""
    by_split: dict[str, list[Item]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    return [i for group in itertools.zip_longest(*by_split.values()) for i in group if i is not None]


def read_lm_eval_samples(output_path: str | Path) -> dict[tuple[str, str], dict]:
    """lm-eval's ``--log_samples`` files under ``output_path`` -> {(cell, item id): row}, each row with
    ``completion`` (lm-eval's raw response), ``first_line`` (after our filter), ``strict`` (our strict
    parse) and ``prompt`` (the context lm-eval gave the model)."""
    out = {}
    for path in sorted(Path(output_path).rglob(f"samples_{GROUP}_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            doc, raw = r["doc"], r["resps"][0][0]
            out[(doc["cell"], doc["id"])] = {
                "completion": raw, "first_line": r["filtered_resps"][0] if r.get("filter") == FILTER else first_line(raw),
                "strict": FORMATS[doc["answer_format"]].strict(raw), "prompt": r["arguments"]["gen_args_0"]["arg_0"],
                "doc": doc}
    return out


# ----------------------------------------------------------------------------------- the export

class _Function(str):
    """A YAML ``!function module.name`` scalar."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def _yaml(obj: dict) -> str:
    text = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    return re.sub(r"!function '([\w.]+)'", r"!function \1", text)


def cell_name(task: str, k: int, demo_seed: int | None) -> str:
    """The lm-eval task name of a cell: ``iclvsft_<task>_k<k>[_seed<s>]`` (test.py's ``<task>/k=<k>[/seed=<s>]``)."""
    return f"{GROUP}_{task}_k{k}" + (f"_seed{demo_seed}" if demo_seed is not None else "")


class _LazyTokenizer:
    """The tokenizer of ``model``, loaded only when it is used: to count a token budget, or for its chat
    template (``prompt_style: chat``); every attribute is the loaded tokenizer's."""

    def __init__(self, model: str, tokenizer=None):
        self.model, self._tok = model, tokenizer

    def _load(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.model)
        return self._tok

    def __call__(self, *args, **kwargs):
        return self._load()(*args, **kwargs)

    def __getattr__(self, name: str):  # only for names not set above: chat_template, apply_chat_template, ...
        if name.startswith("__") or name in ("model", "_tok"):
            raise AttributeError(name)
        return getattr(self._load(), name)

    @property
    def loaded(self) -> bool:
        return self._tok is not None


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` (a name :func:`iclvsft.models.load_model` resolves), without the weights."""
    from .models import build_tiny_tokenizer, is_tiny_model
    from .models.loading import _hub_offline_env, _resolve_source
    from .models.offline import adapter_base

    if is_tiny_model(name) and not Path(name).is_dir():
        return build_tiny_tokenizer()
    kind, source, _ = _resolve_source(name, None)
    if kind == "adapter":
        base = adapter_base(source)
        if not base:
            raise ConfigError(f"adapter folder {name!r} does not record its base model; pass the base model as --model")
        return load_tokenizer(base)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False,
                                             local_files_only=kind != "hub" or _hub_offline_env())
    except (OSError, ValueError) as error:
        raise ConfigError(f"could not load the tokenizer of {name!r} ({type(error).__name__}); the token budgets "
                          "are counted in the model's tokens: pass a model folder, an offline name or a reachable "
                          "hub id as --model, or set eval.max_new_tokens=N") from error


def _cell_files(config: Config, data_dir: Path, tokenizer) -> tuple[dict[str, str], list[dict], dict[str, list[str]]]:
    """Every file of the export as text, the cells' records for export.json, and task -> its cells."""
    from .evaluate import items_to_evaluate, plan_cells, prompt_sha, task_inputs

    ev = config.eval
    tasks = config.eval_tasks
    files: dict[str, str] = {}
    cells: list[dict] = []
    by_task: dict[str, list[str]] = {}
    for name in tasks:
        if not items_to_evaluate(data_dir, name, config):
            raise DataError(f"{data_dir}/{name}/test.jsonl holds no test items of splits {ev.splits}; "
                            "regenerate the data with data.test_pattern / data.test_control > 0")
        inp = task_inputs(data_dir, name, config, tokenizer)
        task = inp.task
        splits = {i.split for i in inp.items}
        for cell in plan_cells([name], ev.shots, ev.demo_seeds):
            shared = demo_order(inp.demo_pool, cell.demo_seed, name, cell.k) if cell.k else []
            inp.check_demos(shared, cell)
            rows = []
            for item in mixed(inp.items):
                demos = shared
                if cell.k and ev.demo_mode == "per_item":
                    demos = per_item_demos(inp.demo_pool, cell.demo_seed, name, cell.k, item)
                    inp.check_demos(demos, cell)
                prompt = build_prompt(task, item.question, demos)
                rows.append({"id": item.id, "task": name, "split": item.split, "cell": cell.key, "k": cell.k,
                             "demo_seed": cell.demo_seed, "format": task.format, "answer_format": task.answer_format,
                             "question": item.question, "answer": item.answer,
                             "shortcut_answer": item.shortcut_answer, "demo_ids": [d.id for d in demos],
                             "prompt_sha256": prompt_sha(prompt), "prompt": prompt})
            cname = cell_name(name, cell.k, cell.demo_seed)
            files[f"{cname}.jsonl"] = "".join(jsonl_line(r) for r in rows)
            files[f"{cname}.yaml"] = _yaml({
                "task": cname,
                "custom_dataset": _Function("utils.load_docs"),
                "dataset_kwargs": {"data_file": f"{cname}.jsonl"},
                "test_split": "test",
                "output_type": "generate_until",
                "doc_to_text": "prompt",
                "doc_to_target": "answer",
                "target_delimiter": "",
                "num_fewshot": 0,
                "generation_kwargs": {"until": [], "max_gen_toks": inp.max_new_tokens, "do_sample": False,
                                      "temperature": 0.0, "repetition_penalty": 1.0},
                "filter_list": [{"name": FILTER, "filter": [{"function": "custom",
                                                             "filter_fn": _Function("utils.first_line")},
                                                            {"function": "take_first"}]}],
                "process_results": _Function("utils.process_results"),
                "metric_list": [{"metric": m, "aggregation": "mean" if m in EVERY_ROW else _Function("utils.mean_of_scored"),
                                 "higher_is_better": m not in LOWER_IS_BETTER} for m in METRICS],
                "metadata": {"version": 1.0},
            })
            by_task.setdefault(name, []).append(cname)
            cells.append({"name": cname, "cell": cell.key, "task": name, "k": cell.k, "demo_seed": cell.demo_seed,
                          "items": len(rows), "splits": {s: sum(r["split"] == s for r in rows) for s in sorted(splits)},
                          "max_gen_toks": inp.max_new_tokens,
                          "demo_ids": [d.id for d in shared] if ev.demo_mode != "per_item" else "per_item"})
    return files, cells, by_task


def export(config: Config, data_dir: str | Path, out_dir: str | Path, tasks: Sequence[str] | None = None,
           shots: Sequence[int] | None = None, demo_seeds: Sequence[int] | None = None, *, limit: int | None = None,
           model: str | None = None, tokenizer=None, force: bool = False) -> list[Path]:
    """Write the lm-eval task configs of ``config``'s evaluation (``tasks`` / ``shots`` / ``demo_seeds``
    / ``limit`` override its eval section) into ``out_dir``; returns the paths written.

    ``model`` (default: the config's) names the model whose tokenizer counts the token budgets;
    ``tokenizer`` passes one already loaded. The same arguments give the same bytes; a folder holding
    another export is refused unless ``force`` (then replaced), one holding anything else always.
    """
    changes = {f"eval.{key}": list(value) if isinstance(value, (list, tuple)) else value
               for key, value in (("tasks", tasks), ("shots", shots), ("demo_seeds", demo_seeds), ("limit", limit))
               if value is not None}
    config = derive(config, changes, "command line")  # re-checked: a bad override is refused like in test.py
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "manifest.json").is_file():
        raise DataError(f"{data_dir}/manifest.json not found; generate the data first "
                        f"(python generate_data.py --out {data_dir}) or pass the folder with --data")
    model = model or config.model
    tok = _LazyTokenizer(model, tokenizer)
    files, cells, by_task = _cell_files(config, data_dir, tok)
    for name, members in by_task.items():
        files[f"{GROUP}_{name}.yaml"] = _yaml({"group": f"{GROUP}_{name}", "task": members,
                                               "metadata": {"version": 1.0}})
    files[f"{GROUP}.yaml"] = _yaml({"group": GROUP, "task": [f"{GROUP}_{n}" for n in by_task],
                                    "metadata": {"version": 1.0}})
    files[UTILS_FILE] = UTILS_PY
    manifest = json.loads((data_dir / "manifest.json").read_text())
    ev = config.eval
    record = {
        "generator": "iclvsft.lm_eval_export",
        "iclvsft": __version__,
        "repo_root": str(Path(__file__).resolve().parent.parent),
        "data_dir": str(data_dir),
        "data_manifest_sha256": sha256_file(data_dir / "manifest.json"),
        "data_seed": manifest.get("seed"),
        "budget_tokenizer": model if tok.loaded else None,
        "format": config.prompt_format,
        "prompt_style": config.prompt_style,
        "eval": {k: getattr(ev, k) for k in ("tasks", "shots", "demo_seeds", "demo_mode", "demo_split", "splits", "limit",
                                    "max_new_tokens")},
        "cells": cells,
        "files": sorted([*files, EXPORT_FILE]),
    }
    record["eval"]["tasks"] = list(by_task)
    files[EXPORT_FILE] = dumps_json(record)
    _write(out_dir, files, force)
    return [out_dir / name for name in sorted(files)]


def _write(out_dir: Path, files: dict[str, str], force: bool) -> None:
    check_folder(out_dir)
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present:
        previous = out_dir / EXPORT_FILE
        if not previous.is_file():
            raise ConfigError(f"--out {out_dir} is not empty and holds no {EXPORT_FILE} (not an export); "
                              "choose another --out")
        try:
            old_files = json.loads(previous.read_text())["files"]
        except (ValueError, KeyError) as error:
            raise ConfigError(f"{previous} is unreadable; remove {out_dir} or choose another --out") from error
        same = sorted(old_files) == sorted(files) and all(
            (out_dir / n).is_file() and (out_dir / n).read_text(encoding="utf-8") == t for n, t in files.items())
        if not same and not force:
            raise ConfigError(f"{out_dir} holds another export (other settings or data); pass --force to replace it "
                              "or choose another --out")
        for name in old_files:
            if name not in files and "/" not in name:
                (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "__pycache__", ignore_errors=True)
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)


# ------------------------------------------------------------------------------------- command line

def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = command_parser(__doc__.splitlines()[0], prog or "python -m iclvsft.lm_eval_export", {
        "--model": "model", "--tasks": "eval.tasks", "--shots": "eval.shots", "--demo-seeds": "eval.demo_seeds",
        "--demo-mode": "eval.demo_mode", "--limit": "eval.limit"})
    p.epilog = ("--model only picks the tokenizer that counts each task's token budget (max_gen_toks), as test.py "
                "does for the model it evaluates; lm-eval's --model_args pretrained=... picks the model. Then run: "
                "lm_eval --model hf --model_args pretrained=PATH_OR_HUB_ID --include_path OUT --tasks iclvsft "
                "--log_samples --output_path DIR (or --model vllm with tensor_parallel_size=N,data_parallel_size=M).")
    p.add_argument("--data", default=None, help="the generated data folder (generate_data.py --out); default "
                   "data/<config name> with --config (where reproduce.py puts it), else data")
    p.add_argument("--out", default="lm_eval_tasks", help="folder for the task YAMLs, their JSONL rows, utils.py "
                   "and export.json (give it to lm_eval --include_path)")
    p.add_argument("--force", action="store_true", help="replace an earlier export with other settings in --out")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python -m iclvsft.lm_eval_export [ARGS]`` (``argv`` default ``sys.argv[1:]``, ``prog`` the name
    ``--help`` shows); returns the exit status: a project error prints one line and returns 2."""
    try:
        args = _parse(_parser(prog), argv)  # --config: a file or a shipped preset's name
        config = cli.resolve(args)
        out = Path(args.out)
        paths = export(config, default_data_dir(args, config), out, model=config.model, force=args.force)
        record = json.loads((out / EXPORT_FILE).read_text())
        command = lm_eval_command(config, out)
    except IclvsftError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_items = sum(c["items"] for c in record["cells"])
    print(f"wrote {len(paths)} files to {out}: {len(record['cells'])} lm-eval tasks "
          f"({', '.join(c['name'] for c in record['cells'])}), {n_items} rows; groups {GROUP} and "
          f"{', '.join(GROUP + '_' + t for t in record['eval']['tasks'])}")
    print(f"run: {command}")
    return 0


def lm_eval_command(config: Config, out: Path) -> str:
    """The lm_eval command that runs the export as test.py runs the config's model here: the weights
    test.py loads (an offline model's prepared folder), its dtype on this machine's device, its batch size.
    A chat-style export already holds the chat template: no --apply_chat_template."""
    from .models import OFFLINE_MODELS, TINY_MODEL_NAME, model_cache_root, resolve_device, resolve_dtype

    name = config.model
    device = resolve_device("auto")
    pretrained = name
    if name == TINY_MODEL_NAME:
        pretrained = "<a folder written by iclvsft.models.save_tiny_model>"
    elif name in OFFLINE_MODELS:  # lm-eval loads a folder: the prepared one, if it is there
        folder = model_cache_root() / name
        pretrained = str(folder) if folder.is_dir() else f"<folder of: iclvsft models {name}>"
    dtype = str(resolve_dtype(config.dtype, device, name=name)).removeprefix("torch.")
    return (f"lm_eval --model hf --model_args pretrained={pretrained},dtype={dtype} --device {device.type} "
            f"--batch_size {config.eval.batch_size} --include_path {out} --tasks {GROUP} "
            "--log_samples --output_path lm_eval_out")


if __name__ == "__main__":
    cli.run(main)
