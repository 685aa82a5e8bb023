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
from iclvsft.io import slug
from iclvsft.evaluate import EvalPlan, evaluate
from iclvsft.tasks import parse_task_list


def int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 0,4,16; got {text!r}") from None


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name (offline name, hub id or folder); config key `model`")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder from finetune.py, loaded on top of --model")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (config eval.tasks, default data.tasks)")
    p.add_argument("--shots", default=None, help="comma-separated shot counts, e.g. 0,4,16 (eval.shots)")
    p.add_argument("--demo-seeds", default=None, help="comma-separated demo seeds (eval.demo_seeds)")
    p.add_argument("--demo-mode", choices=["shared", "per_item"], default=None,
                   help="shared: one demo set per cell, KV-cached; per_item: fresh demos per item (eval.demo_mode)")
    p.add_argument("--limit", type=int, default=None, help="items per split, 0 = all (eval.limit)")
    p.add_argument("--batch-size", type=int, default=None, help="items per forward pass (eval.batch_size)")
    p.add_argument("--dtype", default=None, help="auto | bf16 | fp16 | fp32 (config key dtype)")
    p.add_argument("--data", default="data", help="the generated data folder (generate_data.py --out)")
    p.add_argument("--out", default=None,
                   help="results folder; default results/eval/<model>[__<adapter>]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    config = cli.resolve(args, {
        "model": args.model, "dtype": args.dtype,
        "eval.tasks": parse_task_list(args.tasks) if args.tasks else None,
        "eval.shots": int_list(args.shots, "--shots"), "eval.demo_seeds": int_list(args.demo_seeds, "--demo-seeds"),
        "eval.demo_mode": args.demo_mode, "eval.limit": args.limit, "eval.batch_size": args.batch_size,
    })
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
