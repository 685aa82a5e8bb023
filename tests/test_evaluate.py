"""The evaluation engine: caching, batching, sharding and resuming never change a prediction."""
import json
import os
import sys

import pytest
from conftest import ROOT, free_port, run_all

from iclvsft import engine
from iclvsft import evaluate as ev
from iclvsft.config import derive, load_config
from iclvsft.data import load_items, normalise_question
from iclvsft.errors import ConfigError, DataError
from iclvsft.evaluate import Cell, EvalPlan, Evaluator, demo_order, evaluate
from iclvsft.evaluate import run as eval_run
from iclvsft.io import jsonl_line
from iclvsft.prompts import build_prompt
from iclvsft.tasks import Item, get_task

# Its own: 4 tasks x (12 + 12) test items, counted below, and the overrides eval_config and test.py are given too.
SMALL = ["data.train_pattern=64", "data.train_control=16", "data.test_pattern=12", "data.test_control=12",
         "data.tasks=[expression,boolean,relation,algebra]"]


@pytest.fixture(scope="module")
def data_dir(make_data):
    return make_data(SMALL)


def eval_config(**eval_overrides):
    overrides = [*SMALL, "model=tiny-random-qwen2", "eval.shots=[0,3]", "eval.demo_seeds=[0,1]", "eval.batch_size=4"]
    overrides += [f"eval.{k}={json.dumps(v)}" for k, v in eval_overrides.items()]
    return load_config(None, overrides)


def test_cached_uncached_and_batch_sizes_agree(data_dir, tiny):
    for name in ("expression", "relation", "boolean"):
        task = get_task(name)
        items = load_items(data_dir, name, "test")
        demos = demo_order(load_items(data_dir, name, "train", split="pattern"), 0, name, 4)
        runs = [Evaluator(tiny.model, tiny.tokenizer, bs).run(task, items, demos, 6, use_cache=cache)
                for bs, cache in ((8, True), (1, True), (8, False), (3, False))]
        for other in runs[1:]:
            assert [r["completion"] for r in other] == [r["completion"] for r in runs[0]]
            for a, b in zip(other, runs[0]):
                if a["label_logprobs"]:
                    assert a["constrained"] == b["constrained"]
                    for label in a["label_logprobs"]:
                        assert a["label_logprobs"][label] == pytest.approx(b["label_logprobs"][label], abs=1e-4)


def test_a_cell_in_chunks_builds_its_prefix_once(data_dir, tiny, monkeypatch, tmp_path):
    """A cell's chunks share one prefix pass (evaluate() hands the Evaluator a cell in chunks of
    2 x batch_size, for resume), with the rows a new prefix per chunk gives; other demonstrations
    build their own. Through evaluate(): one prefix pass per cell, however many chunks."""
    built = []
    real = engine.build_prefix
    monkeypatch.setattr(engine, "build_prefix", lambda model, tok, text: built.append(text) or real(model, tok, text))
    task = get_task("relation")
    items = load_items(data_dir, "relation", "test")
    pool = load_items(data_dir, "relation", "train", split="pattern")
    demos, others = demo_order(pool, 0, "relation", 3), demo_order(pool, 1, "relation", 3)
    shared = Evaluator(tiny.model, tiny.tokenizer, 4)
    chunks = [shared.run(task, items[i:i + 8], demos, 6) for i in range(0, len(items), 8)]
    assert len(chunks) == 3 and len(built) == 1
    fresh = [Evaluator(tiny.model, tiny.tokenizer, 4).run(task, items[i:i + 8], demos, 6) for i in range(0, len(items), 8)]
    assert len(built) == 4 and chunks == fresh
    shared.run(task, items[:8], others, 6)
    assert len(built) == 5 and built[-1] != built[0]

    built.clear()
    config = eval_config(tasks=["relation"], shots=[0, 3], demo_seeds=[0, 1])  # 24 items: 3 chunks per cell
    evaluate(EvalPlan(config, data_dir, tmp_path / "eval", "tiny-random-qwen2", None), loaded=tiny,
             show_progress=False)
    assert len(built) == 3  # one per cell: the header alone (k = 0), k = 3 under demo seeds 0 and 1


def test_engine_matches_generate(tiny):
    """Our greedy loop gives the tokens of transformers' own generate(), up to where it stops."""
    import torch

    model, tok = tiny.model, tiny.tokenizer
    for text in ["Compute.\n(1+2)=", "Evaluate.\n(True and False) or True =", "x"]:
        ids = engine.encode(tok, text)
        ours = engine.greedy_ids(model, tok, engine.empty_prefix(), [ids], 8)[0]
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert ours and ours == ref[: len(ours)], (ours, ref)


def tiny_sliding_window_model():
    """A random 2-layer Gemma 3 (one sliding-window layer, window 8) on the tiny byte tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], bos_token_id=None,
                              eos_token_id=256, pad_token_id=257, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0, 1 / param.shape[1] ** 0.5)
    return model.eval()


def test_engine_exact_with_a_sliding_window():
    """Gemma 3's sliding-window layers count pad slots in their window: rows padded after a cached prefix
    longer than the window would see fewer real tokens than alone. The engine must still give every
    row exactly what it gets alone (greedy tokens, first-step log-probabilities, label scores)."""
    from iclvsft.models.tiny import build_tiny_tokenizer

    model, tok = tiny_sliding_window_model(), build_tiny_tokenizer()
    pre = engine.build_prefix(model, tok, "Compute.\n(1+2)=3\n(4+5)=9\n")
    assert pre.length > 2 * model.config.sliding_window
    rows = [engine.encode(tok, t) for t in ("(1+1)=", "(12+34)=", "x=", "(123+456)=")]
    ids, scores = engine.decode(model, tok, pre, rows, 6, range(258))
    logps = engine.continuation_logprobs(model, tok, pre, rows, [2] * len(rows))
    for row, got, score, logp in zip(rows, ids, scores, logps):
        alone_ids, alone_scores = engine.decode(model, tok, pre, [row], 6, range(258))
        assert got == alone_ids[0]
        assert score == pytest.approx(alone_scores[0], abs=1e-4)
        assert logp == pytest.approx(engine.continuation_logprobs(model, tok, pre, [row], [2])[0], abs=1e-4)


def test_demos_are_train_rows_nested_and_never_test_items(data_dir):
    for name in ("expression", "relation"):
        train = load_items(data_dir, name, "train", split="pattern")
        test_q = {normalise_question(i.question) for i in load_items(data_dir, name, "test")}
        d16 = demo_order(train, 5, name, 16)
        assert demo_order(train, 5, name, 4) == d16[:4]
        assert demo_order(train, 6, name, 4) != d16[:4]
        assert all(d.id.startswith(f"{name}-train-pattern") for d in d16)
        assert not {normalise_question(d.question) for d in d16} & test_q
    leak = load_items(data_dir, "expression", "test")[:1]
    with pytest.raises(DataError, match="test questions"):
        inputs = ev.TaskInputs(get_task("expression"), [], [], 8, {normalise_question(leak[0].question)})
        inputs.check_demos(leak, Cell("expression", 1, 0))


def run_eval(data_dir, out, tiny, **kw):
    return evaluate(EvalPlan(eval_config(**kw), data_dir, out, "tiny-random-qwen2", None), loaded=tiny,
                    show_progress=False)


def test_outputs_and_resume_after_interruption(data_dir, tmp_path, tiny, monkeypatch):
    full = tmp_path / "full"
    metrics = run_eval(data_dir, full, tiny)
    rows = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    # 4 tasks x (k=0 + k=3 x 2 seeds) cells x 24 items (algebra and others have both splits)
    assert len(rows) == 4 * 3 * 24 and len(metrics["cells"]) == 12
    assert len({(r["cell"], r["item_id"]) for r in rows}) == len(rows)
    for key in ("prompt_sha256", "completion", "strict", "lenient", "correct", "invalid", "shortcut"):
        assert key in rows[0]
    assert all(r["shortcut"] is None for r in rows if r["task"] == "algebra" and r["split"] == "control")
    table = (full / "table.md").read_text()
    assert "| expression | 3 | 2 |" in table and "tiny-random-qwen2" in table
    assert "prompt format ours, prompt style raw, dtype float32" in table

    # Interrupt: the 5th chunk write leaves half a line and the process "dies".
    calls = {"n": 0}
    real_append = ev.append_rows

    def flaky_append(path, chunk_rows):
        calls["n"] += 1
        if calls["n"] == 5:
            text = "".join(jsonl_line(r) for r in chunk_rows)
            with open(path, "a") as f:
                f.write(text[: len(text) // 2 + 7])
            raise KeyboardInterrupt
        real_append(path, chunk_rows)

    part = tmp_path / "part"
    monkeypatch.setattr(eval_run, "append_rows", flaky_append)  # where evaluate() calls it
    with pytest.raises(KeyboardInterrupt):
        run_eval(data_dir, part, tiny)
    monkeypatch.setattr(ev, "append_rows", real_append)
    assert not (part / "samples.jsonl").read_text().endswith("\n")
    run_eval(data_dir, part, tiny, batch_size=4)
    assert (part / "samples.jsonl").read_bytes() == (full / "samples.jsonl").read_bytes()
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert m1["by_condition"] == m2["by_condition"] and m1["cells"] == m2["cells"]
    assert (full / "table.md").read_text() == (part / "table.md").read_text()
    # A finished run is a no-op; another identity into the same folder is refused.
    before = (full / "samples.jsonl").read_bytes()
    run_eval(data_dir, full, tiny)
    assert (full / "samples.jsonl").read_bytes() == before
    with pytest.raises(ConfigError, match="another run"):
        run_eval(data_dir, full, tiny, limit=3)
    # Fewer demo seeds on a rerun: nothing is dropped from metrics.json (runs into a folder add up);
    # `requested` names the latest run's cells, and the report picks the cells its config plans.
    fewer = run_eval(data_dir, full, tiny, demo_seeds=[0])
    assert sorted(fewer["cells"]) == sorted(metrics["cells"])
    assert fewer["requested"] == sorted(k for k in metrics["cells"] if "seed=1" not in k)
    assert (full / "samples.jsonl").read_bytes() == before
    from iclvsft.report.summary import planned_rows

    assert {r["cell"] for r in planned_rows(full / "metrics.json", fewer["requested"])} == set(fewer["requested"])


def test_every_row_rebuilds_its_prompt(data_dir, tmp_path, tiny):
    """samples.jsonl keeps the question and demonstration ids: enough to rebuild each prompt exactly
    (its sha256 is the row's), shared and per-item demonstrations alike, in either format."""
    from iclvsft.evaluate.evaluator import prompt_sha
    from iclvsft.evaluate.samples import rebuild_prompt

    run_eval(data_dir, tmp_path / "shared", tiny, shots=[0, 3], demo_seeds=[0], limit=2)
    run_eval(data_dir, tmp_path / "item", tiny, demo_mode="per_item", shots=[2], demo_seeds=[0], limit=2)
    for folder in ("shared", "item"):
        rows = [json.loads(line) for line in (tmp_path / folder / "samples.jsonl").read_text().splitlines()]
        assert rows and all(len(r["demo_ids"]) == r["k"] for r in rows)
        for r in rows:
            assert prompt_sha(rebuild_prompt(r, data_dir)) == r["prompt_sha256"]


def test_per_item_demos_mode(data_dir, tmp_path, tiny):
    run_eval(data_dir, tmp_path, tiny, demo_mode="per_item", shots=[2], demo_seeds=[0], limit=4)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], set()).add(r["prompt_sha256"])
    assert all(len(v) == 8 for v in by_task.values())  # every item its own prompt


@pytest.mark.slow
def test_two_processes_match_one(data_dir, tmp_path):
    """accelerate launch with two CPU processes (gloo) gives the same samples as one process.
    (accelerate's own --cpu flag starts a single process without an MPI hostfile, so the DDP
    config file is used with no GPU visible, as in tests/test_train.py.)"""
    common = ["--model", "tiny-random-qwen2", "--data", str(data_dir), "--tasks", "expression,boolean",
              "--shots", "0,2", "--demo-seeds", "0", "--limit", "5", "--batch-size", "2", "--quiet", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    one, two = run_all([sys.executable, "test.py", *common, "--out", str(tmp_path / "one")],  # side by side
                       [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        "configs/accelerate/ddp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()),
                        "test.py", *common, "--out", str(tmp_path / "two")], cwd=ROOT, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "run.json").read_text())["processes"] == 1
    a, b = ([json.loads(line) for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
            for d in ("one", "two"))
    assert len(a) == len(b) == 2 * 2 * 10
    for ra, rb in zip(a, b):  # every prediction identical; log-probs equal up to batch-order rounding
        la, lb = ra.pop("label_logprobs"), rb.pop("label_logprobs")
        assert ra == rb
        if la:
            assert la == pytest.approx(lb, abs=1e-4)


def test_script_errors(data_dir, tmp_path):
    model, data, shots, helped = run_all(*([sys.executable, "test.py", *args] for args in (
        ["--model", "no-such-model-anywhere", "--data", str(data_dir), "--out", str(tmp_path / "x"), *SMALL],
        ["--model", "tiny-random-qwen2", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "y")],
        ["--shots", "0,four", "--data", str(data_dir)], ["--help"])), cwd=ROOT, timeout=120)
    assert model.returncode == 2 and "Traceback" not in model.stderr and "offline" in model.stderr.lower()
    assert data.returncode == 2 and "generate_data.py" in data.stderr
    assert shots.returncode == 2 and "--shots" in shots.stderr
    assert helped.returncode == 0 and "--adapter" in helped.stdout and "--demo-mode" in helped.stdout


def test_one_token_labels_scored_from_the_generation_pass(data_dir, tiny, monkeypatch):
    """Labels that are one token are scored from the generation's own first step; the numbers
    equal a separate forward pass over prompt + label (the path multi-token labels take)."""
    from iclvsft.scoring import FORMATS, AnswerFormat

    task = get_task("relation")
    monkeypatch.setattr(task, "answer_sep", "")
    monkeypatch.setitem(FORMATS, "yesno", AnswerFormat("yesno", "Y|N", lambda m: m.group(0), labels=("Y", "N")))
    items = load_items(data_dir, "relation", "test")[:10]
    items = [Item(**{**i.to_dict(), "answer": i.answer[0], "shortcut_answer": i.shortcut_answer[0]}) for i in items]
    demos = demo_order(load_items(data_dir, "relation", "train", split="pattern"), 0, "relation", 2)
    fast = Evaluator(tiny.model, tiny.tokenizer, 4)
    assert fast.one_token_labels(task, [build_prompt(task, i.question, demos) for i in items]) is not None
    rows_fast = fast.run(task, items, demos, 4)
    monkeypatch.setattr(Evaluator, "one_token_labels", lambda self, task, prompts: None)
    rows_slow = Evaluator(tiny.model, tiny.tokenizer, 4).run(task, items, demos, 4)
    for a, b in zip(rows_fast, rows_slow):
        assert a["constrained"] == b["constrained"]
        for label in ("Y", "N"):
            assert a["label_logprobs"][label] == pytest.approx(b["label_logprobs"][label], abs=1e-4)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_prompt_style_for_icl_ft_and_scoring(data_dir, tmp_path):
    """prompt_style chat: the whole prompt is the user's message of the chat template and the answer the
    assistant's reply, in evaluation (cached = uncached, rows rebuild their prompt) and FT rows alike; a
    model without a template is refused in one line."""
    from iclvsft.evaluate.evaluator import Evaluator, prompt_sha
    from iclvsft.evaluate.samples import rebuild_prompt
    from iclvsft.models import load_model
    from iclvsft.prompts import build_prompt, demo_order
    from iclvsft.tasks import get_task, task_view
    from iclvsft.train import select_rows

    loaded = load_model("tiny-random-qwen2")
    with pytest.raises(ConfigError, match="chat template"):
        task_view(get_task("expression"), "ours", "chat", loaded.tokenizer)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    task = task_view(get_task("expression"), "ours", "chat", loaded.tokenizer)
    prompt = build_prompt(task, "(1+2)+(3-3)*(1+1+1-2)=")
    assert prompt.startswith("<|im_start|>user\nCompute the value") and prompt.endswith("=<|im_end|>\n<|im_start|>assistant\n")
    out = tmp_path / "chat"
    evaluate(EvalPlan(derive(eval_config(shots=[0, 3], demo_seeds=[0], limit=3, tasks=["expression", "boolean"]),
                             {"prompt_style": "chat"}), data_dir, out, "tiny-random-qwen2", None), loaded=loaded,
             show_progress=False)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt_style"] == "chat" for r in rows)
    assert all(prompt_sha(rebuild_prompt(r, data_dir, tokenizer=loaded.tokenizer)) == r["prompt_sha256"] for r in rows)
    # the KV-cached prefix path gives what whole prompts give
    from iclvsft.data import load_items

    items = load_items(data_dir, "expression", "test")[:4]
    demos = demo_order(load_items(data_dir, "expression", "train", split="pattern"), 0, "expression", 3)
    ev = Evaluator(loaded.model, loaded.tokenizer, batch_size=4)
    cached = [r["completion"] for r in ev.run(task, items, demos, 6)]
    assert cached == [r["completion"] for r in ev.run(task, items, demos, 6, use_cache=False)]
    # FT rows: the same prompt, the answer as the reply
    rows_ft, _ = select_rows(data_dir, ["expression"], 2, style="chat", tokenizer=loaded.tokenizer)
    item = load_items(data_dir, "expression", "train", split="pattern")[0]
    assert rows_ft[0]["prompt"] == build_prompt(task, item.question)
    assert rows_ft[0]["completion"] == item.answer + "\n"
