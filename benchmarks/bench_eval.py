#!/usr/bin/env python
"""Evaluation speed: our engine vs the authors' style loop vs batching without the prefix cache.

Same model, same items, same k demonstrations for every item. Three ways to get the greedy
completions:

* ours      - iclvsft.evaluate.Evaluator: the header + demonstrations run once, their KV cache is
              reused by every batch of items (left-padded suffixes), stop at end of line;
* no-cache  - the same batched greedy loop, every row carrying its whole prompt;
* authors'  - one item at a time, full prompt, ``model.generate`` (greedy, fixed max_new_tokens).

Prints seconds, items/s, the speed-up of ours over each, and whether every prediction agrees (the
first line of each completion and its strict parse). Run from the repo root:

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

import torch  # noqa: E402

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
    timed("ours", lambda: [r["completion"] for r in ev.run(task, items, demos, max_new)])
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
