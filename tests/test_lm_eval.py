"""The lm-evaluation-harness export (iclvsft.lm_eval_export): what it writes, that its prompts are
test.py's, that its metric is our strict scorer, and that lm-eval run on the export predicts exactly
what test.py predicts, item by item (the tiny model, shared demonstrations, k in {0, 2}), in the raw
prompt style and in the chat style (the tokenizer's chat template), every metric scored on the same
documents and lm-eval's --limit giving both splits."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from iclvsft import __version__
from iclvsft.config import derive, load_config
from iclvsft.data import load_items
from iclvsft.evaluate import prompt_sha, task_inputs
from iclvsft.lm_eval_export import (
    EXPORT_FILE,
    FILTER,
    METRICS,
    cell_name,
    export,
    first_line,
    first_line_filter,
    main,
    mean_of_scored,
    process_results,
    read_lm_eval_samples,
)
from iclvsft.models import build_tiny_tokenizer
from iclvsft.prompts import build_prompt, demo_order, per_item_demos
from iclvsft.scoring import score
from iclvsft.tasks import Item, get_task

TASKS = ["expression", "boolean"]
# Its own: 8 + 8 test items a task, which the row counts below (4 cells x 10, limit 5) depend on.
DATA = ["data.tasks=[expression,boolean]", "data.train_pattern=32", "data.train_control=4",
        "data.test_pattern=8", "data.test_control=8"]
EVAL = ["model=tiny-random-qwen2", "eval.tasks=[expression,boolean]", "eval.shots=[0,2]", "eval.demo_seeds=[0]",
        "eval.limit=5"]
CELLS = [cell_name(t, k, s) for t in TASKS for k, s in ((0, None), (2, 0))]
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


class _FunctionLoader(yaml.SafeLoader):
    pass


_FunctionLoader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


def read_yaml(path):
    return yaml.load(path.read_text(), Loader=_FunctionLoader)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def config():
    return load_config(None, DATA + EVAL)


@pytest.fixture(scope="module")
def data(make_data):
    return make_data(DATA)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, config, data):
    out = tmp_path_factory.mktemp("lm_eval") / "tasks"
    export(config, data, out)
    return out


def test_layout_and_task_yaml(exported, config, data):
    names = sorted(p.name for p in exported.iterdir())
    expected = sorted([*(f"{c}.{ext}" for c in CELLS for ext in ("yaml", "jsonl")), "iclvsft.yaml",
                       "iclvsft_expression.yaml", "iclvsft_boolean.yaml", "utils.py", EXPORT_FILE])
    assert names == expected
    assert read_yaml(exported / "iclvsft.yaml") == {"group": "iclvsft", "task": ["iclvsft_expression", "iclvsft_boolean"],
                                                    "metadata": {"version": 1.0}}
    assert read_yaml(exported / "iclvsft_boolean.yaml")["task"] == ["iclvsft_boolean_k0", "iclvsft_boolean_k2_seed0"]
    record = json.loads((exported / EXPORT_FILE).read_text())
    assert sorted(record["files"]) == expected and [c["name"] for c in record["cells"]] == CELLS
    assert record["iclvsft"] == __version__ and record["prompt_style"] == "raw" and record["format"] == "ours"
    for name in TASKS:
        budget = task_inputs(data, name, config, build_tiny_tokenizer()).max_new_tokens  # test.py's
        for cell in (cell_name(name, 0, None), cell_name(name, 2, 0)):
            y = read_yaml(exported / f"{cell}.yaml")
            assert y["task"] == cell and y["output_type"] == "generate_until"
            assert y["doc_to_text"] == "prompt" and y["doc_to_target"] == "answer" and y["num_fewshot"] == 0
            assert y["custom_dataset"] == ("!function", "utils.load_docs")
            assert y["dataset_kwargs"] == {"data_file": f"{cell}.jsonl"} and y["test_split"] == "test"
            g = y["generation_kwargs"]
            assert g["max_gen_toks"] == budget and g["do_sample"] is False and g["temperature"] == 0.0
            assert g["until"] == []  # the first line is cut by the filter, as test.py reads it (see first_line)
            assert y["filter_list"][0]["name"] == FILTER
            assert y["process_results"] == ("!function", "utils.process_results")
            assert [m["metric"] for m in y["metric_list"]] == ["accuracy", "lenient_accuracy", "invalid",
                                                               "pattern_accuracy", "control_accuracy",
                                                               "control_shortcut_rate"]
            # one split's metrics average over the rows they apply to; the others over every row
            assert [m["aggregation"] for m in y["metric_list"]] == \
                ["mean"] * 3 + [("!function", "utils.mean_of_scored")] * 3
    # the hooks, loaded the way lm-eval loads a YAML's `!function utils.NAME` (from beside the YAML)
    spec = importlib.util.spec_from_file_location("utils", exported / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = utils.load_docs(f"{CELLS[1]}.jsonl", version=1.0)["test"]
    assert [dict(d) for d in docs] == rows(exported / f"{CELLS[1]}.jsonl")
    assert utils.first_line([["\n 12\nx"]], [docs[0]]) == [["12"]]
    assert utils.process_results(docs[0], [docs[0]["answer"]])["accuracy"] == 1.0


def test_prompts_are_test_py_prompts(exported, data):
    """Every row's prompt is build_prompt with the cell's shared, nested demonstrations (demo_order)."""
    for name in TASKS:
        task = get_task(name)
        test = load_items(data, name, "test")
        # the splits interleaved, so that lm-eval's --limit N (the first N rows) gives both
        items = [i for pair in zip([i for i in test if i.split == "pattern"][:5],
                                   [i for i in test if i.split == "control"][:5]) for i in pair]
        pool = load_items(data, name, "train", split="pattern")
        for k, seed in ((0, None), (2, 0)):
            demos = demo_order(pool, seed, name, k) if k else []
            got = rows(exported / f"{cell_name(name, k, seed)}.jsonl")
            assert [r["id"] for r in got] == [i.id for i in items]
            for r, item in zip(got, items):
                prompt = build_prompt(task, item.question, demos)
                assert r["prompt"] == prompt and r["prompt_sha256"] == prompt_sha(prompt)
                assert (r["split"], r["answer"], r["shortcut_answer"]) == (item.split, item.answer, item.shortcut_answer)
                assert r["demo_ids"] == [d.id for d in demos] and r["cell"] == f"{name}/k={k}" + (
                    f"/seed={seed}" if k else "")
        assert demo_order(pool, 0, name, 2)[:1] == demo_order(pool, 0, name, 1)  # nested across k


def test_per_item_demonstrations(tmp_path, config, data):
    cfg = derive(config, {"eval.demo_mode": "per_item", "eval.tasks": ["expression"], "eval.shots": [2]})
    export(cfg, data, tmp_path / "t")
    got = rows(tmp_path / "t" / f"{cell_name('expression', 2, 0)}.jsonl")
    pool = load_items(data, "expression", "train", split="pattern")
    items = {i.id: i for i in load_items(data, "expression", "test")}
    for r in got:
        demos = per_item_demos(pool, 0, "expression", 2, items[r["id"]])
        assert r["prompt"] == build_prompt(get_task("expression"), items[r["id"]].question, demos)
    assert len({tuple(r["demo_ids"]) for r in got}) > 1


def test_metric_is_our_strict_scorer():
    """The filter keeps test.py's first line (leading newlines skipped, where until "\\n" would give
    ""); process_results scores it exactly as iclvsft.scoring does."""
    doc = {"id": "x", "task": "expression", "split": "control", "question": "q=", "answer": "7",
           "shortcut_answer": "3", "answer_format": "int"}
    item = Item(id="x", task="expression", split="control", question="q=", answer="7", shortcut_answer="3")
    for completion in [" 7\n", "7.", "\n\n 7\n", "\n3\n", "The answer is 7", "10", "", "7 or 3", "-0"]:
        line = first_line_filter([[completion]], [doc])[0][0]
        assert line == first_line(completion)
        got, want = process_results(doc, [line]), score(item, completion, "int")
        assert got["accuracy"] == got["control_accuracy"] == float(want.correct)
        assert got["invalid"] == float(want.invalid) and got["control_shortcut_rate"] == float(want.shortcut)
        assert got["lenient_accuracy"] == float(want.lenient_correct) and got["pattern_accuracy"] is None
        assert list(got) == list(METRICS)  # every metric on every row: lm-eval scores all on the same documents
    assert first_line("\n\n 7\nx") == "7"
    assert process_results({**doc, "split": "pattern"}, ["7"])["control_shortcut_rate"] is None
    assert mean_of_scored([1.0, None, 0.0, None, 1.0]) == pytest.approx(2 / 3) and mean_of_scored([None]) is None


def test_command_line(tmp_path, data, capsys, root):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--data", "--out", "--tasks", "--shots", "--demo-seeds", "--limit", "--model", "--force"):
        assert option in text
    out = tmp_path / "t"
    args = ["--data", str(data), "--out", str(out), "--model", "tiny-random-qwen2", "--tasks", "expression",
            "--shots", "0,2", "--demo-seed", "0", "--limit", "3", *DATA]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(args) == 0  # same arguments, same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    capsys.readouterr()
    assert main([*args[:-len(DATA)], "--shots", "0", *DATA]) == 2  # another export: refused
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert main([*args[:-len(DATA)], "--shots", "0", "--force", *DATA]) == 0
    assert not (out / f"{cell_name('expression', 2, 0)}.jsonl").exists()  # the replaced export's files are gone
    capsys.readouterr()
    # --config takes a shipped preset's name like every command; the printed command is complete
    assert main(["--config", "cpu", *args[:-len(DATA)], "--shots", "0", "--force", *DATA]) == 0
    printed = capsys.readouterr().out
    assert f"--include_path {out} --tasks iclvsft" in printed and ",dtype=float32 --device cpu --batch_size 16" in printed
    proc = subprocess.run([sys.executable, "-m", "iclvsft.lm_eval_export", "--data", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "x")], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run_lm_eval(tmp_path, exported, model_dir, root, *extra):
    """lm-eval's HF backend on the export (a subprocess, offline); returns its logged samples, results, stderr."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--batch_size", "3",
                           "--include_path", str(exported), "--tasks", "iclvsft", "--log_samples",
                           "--output_path", str(tmp_path / "lm_eval_out"), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not scored on the same number" not in proc.stderr
    results = json.loads(next((tmp_path / "lm_eval_out").rglob("results_*.json")).read_text())["results"]
    return read_lm_eval_samples(tmp_path / "lm_eval_out"), results


def assert_same_predictions(theirs, ours):
    for key, t in theirs.items():
        r = ours[key]
        assert prompt_sha(t["prompt"]) == r["prompt_sha256"], key  # lm-eval gave the model test.py's prompt
        assert t["first_line"] == first_line(r["completion"]), (key, t["completion"], r["completion"])
        assert t["strict"] == r["strict"], key


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory, data):
    """(model_dir, config, exported): the tiny model saved with a ChatML template, and the chat-style export
    of expression that uses it."""
    from transformers import AutoTokenizer

    from iclvsft.models import save_tiny_model

    tmp_path = tmp_path_factory.mktemp("lm_eval_chat")
    model_dir = save_tiny_model(tmp_path / "tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(model_dir)
    config = load_config(None, [*DATA, *EVAL, f"model={model_dir}", "prompt_style=chat", "eval.tasks=[expression]"])
    exported = tmp_path / "tasks"
    export(config, data, exported)
    return model_dir, config, exported


@pytest.fixture(scope="module")
def lm_eval_runs(tmp_path_factory, exported, chat_export, root):
    """The two tests' lm-eval runs (each a ~12 s subprocess on one core), side by side: "raw" on the export
    with the tiny model, "chat" on chat_export with --limit 4; each (samples, results)."""
    from iclvsft.models import save_tiny_model

    raw, chat = tmp_path_factory.mktemp("lm_eval_raw"), tmp_path_factory.mktemp("lm_eval_chat_run")
    model_dir = save_tiny_model(raw / "tiny")
    with ThreadPoolExecutor(2) as pool:
        runs = {"raw": pool.submit(run_lm_eval, raw, exported, model_dir, root),
                "chat": pool.submit(run_lm_eval, chat, chat_export[2], chat_export[0], root, "--limit", "4")}
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is not installed (pip install -r requirements-dev.txt)")
def test_lm_eval_predicts_what_test_py_predicts(tmp_path, lm_eval_runs, config, data, tiny):
    """lm-eval (HF backend, batched with left padding) on the export vs iclvsft.evaluate (test.py's
    engine: KV-cached shared prefix) on the same items, shots and demo seed: identical first lines."""
    from iclvsft.evaluate import EvalPlan, evaluate

    theirs, results = lm_eval_runs["raw"]

    evaluate(EvalPlan(config, data, tmp_path / "ours", "tiny-random-qwen2", None), loaded=tiny, show_progress=False)
    ours = {(r["cell"], r["item_id"]): r for r in map(json.loads, (tmp_path / "ours" / "samples.jsonl").open())}
    assert len(ours) == 4 * 10 and set(theirs) == set(ours)
    assert_same_predictions(theirs, ours)
    for name in CELLS:  # lm-eval's aggregate is our strict accuracy of the same rows
        cell_rows = [r for r in ours.values() if cell_name(r["task"], r["k"], r["demo_seed"]) == name]
        assert results[name][f"accuracy,{FILTER}"] == pytest.approx(sum(r["correct"] for r in cell_rows) / 10)
        assert results[name][f"invalid,{FILTER}"] == pytest.approx(sum(r["invalid"] for r in cell_rows) / 10)


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is not installed (pip install -r requirements-dev.txt)")
def test_lm_eval_chat_style_with_limit_predicts_what_test_py_predicts(tmp_path, data, chat_export, lm_eval_runs):
    """prompt_style chat: the export renders the prompts with the model's own tokenizer's chat template
    (here a ChatML template saved with the tiny model), and lm-eval on it predicts what test.py
    predicts; lm-eval's --limit 4 takes two pattern and two control rows of each cell."""
    from iclvsft.evaluate import EvalPlan, evaluate

    model_dir, config, exported = chat_export
    assert json.loads((exported / EXPORT_FILE).read_text())["prompt_style"] == "chat"
    theirs, results = lm_eval_runs["chat"]

    evaluate(EvalPlan(config, data, tmp_path / "ours", str(model_dir), None), show_progress=False)
    ours = {(r["cell"], r["item_id"]): r for r in map(json.loads, (tmp_path / "ours" / "samples.jsonl").open())}
    assert len(theirs) == 2 * 4 and set(theirs) <= set(ours)
    assert all(t["prompt"].startswith("<|im_start|>user\n") for t in theirs.values())
    assert_same_predictions(theirs, ours)
    for cell, name in (("expression/k=0", cell_name("expression", 0, None)),
                       ("expression/k=2/seed=0", cell_name("expression", 2, 0))):
        cell_rows = [ours[key] for key in theirs if key[0] == cell]
        assert sorted(r["split"] for r in cell_rows) == ["control", "control", "pattern", "pattern"]
        pattern = [r["correct"] for r in cell_rows if r["split"] == "pattern"]
        assert results[name][f"pattern_accuracy,{FILTER}"] == pytest.approx(sum(pattern) / 2)
