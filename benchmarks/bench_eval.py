#!/usr/bin/env python
"""Evaluation speed: our engine vs the authors' style loop vs batching without the prefix cache.

Same model, same items, same k demonstrations for every item. Three ways to get the greedy
completions:

* ours      - iclvsft.evaluate.Evaluator: the header + demonstrations run once, their KV cache is
              reused by every batch of items (left-padded suffixes), stop at end of line;
* no-cache  - the same batched greedy loop, every row carrying its whole prompt;
* authors'  - one item at a time, full prompt, ``model.generate`` (greedy, fixed max_new_tokens).

With ``--lm-eval``, instead: lm-evaluation-harness (HF backend) against ``test.py``, each run end to
end as a user runs it (a fresh process: start-up, model loading, evaluation, writing results), on the
same items with the same demonstrations: the task is written as an lm-eval task config (YAML + JSONL:
the header as ``description``, the demonstrations in our order with the ``first_n`` sampler, the
same separators, greedy until end of line), so both build byte-identical prompts. Needs
``pip install -r requirements-bench.txt``.

Prints seconds, items/s, the speed-up of ours over each, and whether every prediction agrees (the
first line of each completion and its strict parse). For ``ours`` also the rate of the arithmetic the
engine executes (FLOPs of every token it runs through the model, pads and the shared prefix included)
as a share of a dense bf16/fp32 matmul measured in the same run; with ``--lm-eval``, the share of
``test.py``'s wall time that is start-up (interpreter, imports, model load: timed in a separate process
that does only that). Run from the repo root:

    .venv/bin/python benchmarks/bench_eval.py --model qwen2.5-coder-0.5b-instruct --shots 32 --items 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_train import matmul_params, matmul_rate  # noqa: E402

from iclvsft import engine  # noqa: E402
from iclvsft.config import load_config  # noqa: E402
from iclvsft.data import generate, load_items  # noqa: E402
from iclvsft.evaluate import Evaluator, demo_order, max_new_tokens_for  # noqa: E402
from iclvsft.io import provenance  # noqa: E402
from iclvsft.models import load_model  # noqa: E402
from iclvsft.prompts import build_prompt  # noqa: E402
from iclvsft.scoring import FORMATS  # noqa: E402
from iclvsft.tasks import get_task  # noqa: E402


def first_line(text: str) -> str:
    return text.lstrip().split("\n", 1)[0]


def authors_loop(model, tokenizer, prompts, max_new_tokens):
    """One item at a time, whole prompt, transformers' generate()."""
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


class ForwardFlops:
    """Counts the FLOPs of every forward pass of ``model`` (a forward pre-hook): per call with input
    [B, T] over a mask of width W (cached tokens + T), ``2 * N * B * T`` for the weights used in matmuls
    (the output layer only at the positions kept, ``logits_to_keep``) plus causal attention,
    ``4 * layers * d_attn * B * sum over the T positions of its context`` (QK^T and AV, 2 FLOPs per
    multiply-add). Pads count: they are computed. Every layer is counted as attending over the whole
    context: right for the Qwen2 models this is run on; a sliding-window layer (Gemma 3) would be
    overcounted."""

    def __init__(self, model):
        config = model.config
        self.layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.d_attn = config.num_attention_heads * head_dim
        n_params = sum(p.numel() for p in model.parameters())
        self.head = config.vocab_size * config.hidden_size
        self.body = matmul_params(config, n_params) - self.head
        self.flops, self.tokens, self.calls = 0.0, 0, 0
        self.handle = model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        b, t = ids.shape
        mask = kwargs.get("attention_mask")
        width = mask.shape[-1] if mask is not None else t
        kept = kwargs.get("logits_to_keep", 0)
        kept = t if not kept else (kept if isinstance(kept, int) else int(kept.numel()))
        context = t * (width - t) + t * (t + 1) / 2  # position i of T sees the cached tokens and i + 1 of its own
        self.flops += 2 * self.body * b * t + 2 * self.head * b * kept + 4 * self.layers * self.d_attn * b * context
        self.tokens += b * t
        self.calls += 1


def start_up_seconds(args) -> dict:
    """A fresh process doing only what test.py does before its first item: the interpreter, test.py's
    imports (the command and the evaluation package), loading the model and tokenizer."""
    import subprocess

    code = ("import time, json; t0 = time.perf_counter()\n"
            "from iclvsft.commands import test_main\nimport iclvsft.evaluate.run\n"
            "from iclvsft.models import load_model\nt1 = time.perf_counter()\n"
            f"load_model({args.model!r}, dtype={args.dtype!r}, show_progress=False)\n"
            "print(json.dumps({'imports': t1 - t0, 'load': time.perf_counter() - t1}))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, check=True)
    inside = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"total": time.perf_counter() - t0, **inside}


def resolved_dtype(dtype: str, model: str) -> tuple[str, str]:
    """The one dtype both tools run in, as (test.py's name, lm-eval's name), e.g. ``("fp32", "float32")``:
    ``auto`` resolved as test.py resolves it on this CPU (bf16 only where the CPU has native bf16, else
    fp32), so lm-eval, which is told a dtype explicitly, never runs in another precision than ours."""
    from iclvsft.models import resolve_dtype

    name = str(resolve_dtype(dtype, "cpu", name=model)).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[name], name


def lm_eval_end_to_end(args, data: Path, task, items, demos, train) -> int:
    """test.py and lm_eval, each timed from process start to exit; completions compared item by item."""
    import subprocess

    import yaml

    from iclvsft.models import ensure_offline_model, offline_model_names

    model_path = str(ensure_offline_model(args.model)) if args.model in offline_model_names() else args.model
    tok = load_model(args.model, dtype="fp32", device="cpu").tokenizer
    max_new = max_new_tokens_for(tok, task, [i.answer for i in load_items(data, args.task, "train")])  # as test.py
    work = Path(tempfile.mkdtemp(prefix="bench-lmeval-"))
    (work / "test.jsonl").write_text("".join(json.dumps({"id": i.id, "question": i.question, "answer": i.answer}) + "\n"
                                             for i in items))
    (work / "demos.jsonl").write_text("".join(json.dumps({"id": d.id, "question": d.question, "answer": d.answer})
                                              + "\n" for d in demos))
    sep = "\n\n" if task.multiline else "\n"
    (work / "iclvsft_bench.yaml").write_text(yaml.safe_dump({
        "task": "iclvsft_bench", "dataset_path": "json", "output_type": "generate_until",
        "dataset_kwargs": {"data_files": {"test": str(work / "test.jsonl"), "train": str(work / "demos.jsonl")}},
        "test_split": "test", "fewshot_split": "train", "num_fewshot": args.shots,
        "fewshot_config": {"sampler": "first_n"}, "description": task.header + "\n",
        "doc_to_text": "{{question}}", "doc_to_target": task.answer_sep + "{{answer}}", "target_delimiter": "",
        "fewshot_delimiter": sep, "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_new, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}, sort_keys=False))
    ours_dtype, dtype = resolved_dtype(args.dtype, args.model)
    print(f"both tools in {dtype}")
    n_split = {"pattern": sum(i.split == "pattern" for i in items), "control": sum(i.split != "pattern" for i in items)}
    runs = {
        "test.py": [sys.executable, "test.py", "--model", args.model, "--data", str(data), "--tasks", args.task,
                    "--shots", str(args.shots), "--demo-seeds", "0", "--limit", str(max(n_split.values())),
                    "--batch-size", str(args.batch_size), "--dtype", ours_dtype, "--out", str(work / "ours"),
                    "--quiet"],
        "lm-eval": [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={model_path},dtype={dtype}", "--device", "cpu", "--batch_size", str(args.batch_size),
                    "--include_path", str(work), "--tasks", "iclvsft_bench", "--log_samples",
                    "--output_path", str(work / "lmeval")],
    }
    seconds = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
        seconds[name] = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        print(f"{name:<8} {seconds[name]:7.1f} s end to end ({len(items) / seconds[name]:.2f} items/s)")
    start = start_up_seconds(args)
    print(f"start-up alone {start['total']:.1f} s (imports {start['imports']:.1f} s, model load {start['load']:.1f} s): "
          f"{100 * start['total'] / seconds['test.py']:.0f}% of test.py's wall time")
    ours = {r["item_id"]: r["completion"] for r in map(json.loads, (work / "ours" / "samples.jsonl").open())}
    theirs = {}
    for path in (work / "lmeval").rglob("samples_iclvsft_bench_*.jsonl"):
        for r in map(json.loads, path.open()):
            theirs[r["doc"]["id"]] = r["resps"][0][0]
    same = sum(first_line(ours.get(i.id, "")) == first_line(theirs.get(i.id, "\0")) for i in items)
    print(f"test.py is {seconds['lm-eval'] / seconds['test.py']:.1f}x faster end to end; identical first lines "
          f"{same}/{len(items)} ({len(ours)} test.py rows, {len(theirs)} lm-eval rows)")
    differences = [{"id": i.id, "test.py": first_line(ours.get(i.id, "")), "lm-eval": first_line(theirs.get(i.id, ""))}
                   for i in items if first_line(ours.get(i.id, "")) != first_line(theirs.get(i.id, "\0"))]
    if differences:
        explain(args, ours_dtype, task, {i.id: i for i in items}, demos, max_new, differences)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "dtype": dtype, "seconds": seconds,
                                               "start_up_seconds": start,
                                               "start_up_share_of_test_py": start["total"] / seconds["test.py"],
                                               "identical": same,
                                               "items": len(items), "differences": differences,
                                               "provenance": provenance()}, indent=2))
    return 0


def explain(args, run_dtype: str, task, items: dict, demos, max_new: int, differences: list[dict]) -> None:
    """Where the two tools disagree: each such prompt again, alone (one row: no padding, no batch, no
    cache; transformers' generate), in the run's precision and in fp32, with the smallest gap between
    the two most likely tokens over the greedy steps (a near-tie shows as a gap of a rounding error).
    ``run_dtype``: the run's precision, as test.py was given it."""
    for dtype in dict.fromkeys([run_dtype, "fp32"]):
        loaded = load_model(args.model, dtype=dtype)
        model, tok = loaded.model.eval(), loaded.tokenizer
        for d in differences:
            enc = tok(build_prompt(task, items[d["id"]].question, demos), return_tensors="pt")
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            tokens = gen.sequences[0, enc["input_ids"].shape[1]:].tolist()
            # the steps of the first line: up to and including the first token that ends it
            n = next((k + 1 for k in range(len(tokens)) if "\n" in tok.decode(tokens[:k + 1])), len(tokens))
            tops = [torch.topk(score[0].float(), 2) for score in gen.scores[:n]]
            step = min(range(len(tops)), key=lambda k: float(tops[k].values[0] - tops[k].values[1]))
            name = str(loaded.info.get("dtype", dtype))
            d[f"alone_{name}"] = first_line(tok.decode(tokens, skip_special_tokens=True))
            d[f"smallest_gap_{name}"] = {"step": step, "gap": float(tops[step].values[0] - tops[step].values[1]),
                                         "top2": [tok.decode(t) for t in tops[step].indices.tolist()]}
            print(f"{d['id']}: test.py {d['test.py']!r}, lm-eval {d['lm-eval']!r}, alone in {name} "
                  f"{d[f'alone_{name}']!r} (smallest top-2 gap {d[f'smallest_gap_{name}']['gap']:.4f} at step "
                  f"{step}: {d[f'smallest_gap_{name}']['top2']})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model name (iclvsft.models)")
    p.add_argument("--task", default="expression", help="task")
    p.add_argument("--shots", type=int, default=32, help="demonstrations per prompt")
    p.add_argument("--items", type=int, default=50, help="test items (half pattern, half control)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of ours and no-cache")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp32")
    p.add_argument("--data", default=None, help="a data folder; default: generate a small one in a temp dir")
    p.add_argument("--skip", default="", help="comma-separated runs to skip: authors,nocache")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--lm-eval", action="store_true",
                   help="compare test.py with lm-evaluation-harness end to end instead (requirements-bench.txt)")
    args = p.parse_args()

    data = args.data
    if data is None:
        data = tempfile.mkdtemp(prefix="bench-data-")
        generate(load_config(None, [f"data.tasks=[{args.task}]", "data.train_pattern=512", "data.train_control=16",
                                    "data.test_pattern=100", "data.test_control=100"]), data, show_progress=False)
    task = get_task(args.task)
    test = load_items(data, args.task, "test")
    half = args.items // 2
    items = [i for i in test if i.split == "pattern"][:args.items - half] + [i for i in test if i.split != "pattern"][:half]
    train = load_items(data, args.task, "train", split="pattern")
    demos = demo_order(train, 0, args.task, args.shots)
    if args.lm_eval:
        return lm_eval_end_to_end(args, Path(data), task, items, demos, train)
    loaded = load_model(args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    max_new = max_new_tokens_for(tok, task, [i.answer for i in train])
    prompts = [build_prompt(task, i.question, demos) for i in items]
    n_prompt_tokens = sum(len(engine.encode(tok, q)) for q in prompts) / len(prompts)
    print(f"model {args.model} ({loaded.info.get('dtype')}, {loaded.info.get('attn_implementation')}), task {args.task}, "
          f"{args.shots} shots, {len(items)} items, ~{n_prompt_tokens:.0f} prompt tokens per item, "
          f"max_new_tokens {max_new}, torch threads {torch.get_num_threads()}")

    results = {}
    fmt = FORMATS[task.answer_format]

    def timed(name, fn):
        t0 = time.perf_counter()
        completions = fn()
        secs = time.perf_counter() - t0
        results[name] = {"seconds": secs, "items_per_s": len(items) / secs,
                         "first_lines": [first_line(c) for c in completions],
                         "strict": [fmt.strict(c) for c in completions]}
        print(f"{name:<10} {secs:8.1f} s  {len(items) / secs:7.2f} items/s")

    ev = Evaluator(model, tok, args.batch_size, constrained=False)
    counter = ForwardFlops(model)
    timed("ours", lambda: [r["completion"] for r in ev.run(task, items, demos, max_new)])
    counter.handle.remove()
    dtype = next(model.parameters()).dtype
    rates = {str(d).removeprefix("torch."): matmul_rate(d) for d in dict.fromkeys([dtype, torch.float32])}
    rate = counter.flops / results["ours"]["seconds"]
    results["ours"].update(executed_flops=counter.flops, forward_calls=counter.calls, tokens_run=counter.tokens,
                           executed_flops_per_second=rate, matmul_flops_per_second=rates,
                           executed_fraction_of_matmul=rate / rates[str(dtype).removeprefix("torch.")])
    print(f"ours executed {counter.flops / 1e12:.2f} TFLOP in {counter.calls} forward passes ({counter.tokens} tokens, "
          f"pads and prefix included): {rate / 1e9:.0f} GFLOP/s, "
          f"{100 * results['ours']['executed_fraction_of_matmul']:.1f}% of a 2048^3 matmul in "
          f"{str(dtype).removeprefix('torch.')} ({', '.join(f'{k} {v / 1e9:.0f}' for k, v in rates.items())} GFLOP/s)")
    if "nocache" not in args.skip:
        timed("no-cache", lambda: [r["completion"] for r in ev.run(task, items, demos, max_new, use_cache=False)])
    if "authors" not in args.skip:
        timed("authors", lambda: authors_loop(model, tok, prompts, max_new))
    ours = results["ours"]
    summary = {}
    for name, r in results.items():
        if name == "ours":
            continue
        same = sum(a == b for a, b in zip(ours["first_lines"], r["first_lines"]))
        same_strict = sum(a == b for a, b in zip(ours["strict"], r["strict"]))
        ratio = r["seconds"] / ours["seconds"]
        summary[name] = {"speedup_of_ours": ratio, "same_first_line": same, "same_strict_parse": same_strict}
        print(f"ours vs {name:<9}: {ratio:5.1f}x faster; identical predictions {same}/{len(items)} "
              f"(strict parse {same_strict}/{len(items)})")
    acc = sum(a == i.answer for a, i in zip(ours["strict"], items)) / len(items)
    print(f"strict accuracy of these predictions: {100 * acc:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model_info": loaded.info, "results": results,
                                               "summary": summary, "provenance": provenance()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
