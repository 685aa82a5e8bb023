#!/usr/bin/env python
"""Evaluate a model on the test items: zero-shot, k-shot ICL, or a fine-tuned adapter zero-shot.

Writes DIR/samples.jsonl (one row per item x condition), DIR/metrics.json and DIR/table.md.
Rerunning into the same DIR continues where it stopped. Under `accelerate launch` the items are
split across processes and gathered on the main one.
"""
from __future__ import annotations

from pathlib import Path

from iclvsft import cli
from iclvsft.errors import ConfigError
from iclvsft.evaluate import EvalPlan, evaluate
from iclvsft.io import slug


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0], {
        "--model": "model", "--tasks": "eval.tasks", "--shots": "eval.shots", "--demo-seeds": "eval.demo_seeds",
        "--demo-mode": "eval.demo_mode", "--limit": "eval.limit", "--batch-size": "eval.batch_size",
        "--dtype": "dtype"})
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder from finetune.py, loaded on top of --model")
    p.add_argument("--data", default="data", help="the generated data folder (generate_data.py --out)")
    p.add_argument("--out", default=None,
                   help="results folder; default results/eval/<model>[__<adapter>]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_intermixed_args()  # overrides may come before or after the named options
    config = cli.resolve(args)
    if args.adapter and not Path(args.adapter).is_dir():
        raise ConfigError(f"--adapter {args.adapter}: no such folder (finetune.py --out writes one)")
    out = Path(args.out) if args.out else Path("results/eval") / (
        slug(config["model"]) + (f"__{slug(args.adapter)}" if args.adapter else ""))
    metrics = evaluate(EvalPlan(config, Path(args.data), out, config["model"], args.adapter),
                       show_progress=not args.quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:  # the state evaluate() initialised
        print((out / "table.md").read_text())
        print(f"wrote {out}/samples.jsonl, metrics.json, table.md ({len(metrics['cells'])} cells)")
    return 0


if __name__ == "__main__":
    cli.run(main)
