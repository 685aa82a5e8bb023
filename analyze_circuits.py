#!/usr/bin/env python
"""Circuit shift: attribute the answer to every attention head and MLP under base zero-shot, base + k demonstrations (ICL) and base + fine-tuned adapter (FT).

Clean = a test item, corrupted = a minimal edit of it that changes the answer's first token (same
token length); metric = logit difference between the two answers' first tokens; attribution patching
(gradient x activation difference) and/or exact activation patching; shift = distance of the ICL and FT
maps from the base map (1 - cosine, normalised L1, top-k overlap) with bootstrap intervals. See
iclvsft/circuits.py for the method and every choice.

Writes DIR/config.json, DIR/scores.jsonl (one row per task x condition x pair), DIR/circuits.json,
DIR/circuits.md and DIR/plots/<task>/*.png. Needs the generated data (generate_data.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from iclvsft import cli
from iclvsft.circuits import CORRUPTIONS, METHODS, analyze, report_section
from iclvsft.errors import ConfigError
from iclvsft.tasks import parse_task_list


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_")[-80:]


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name (offline name, hub id or folder); config key `model`")
    p.add_argument("--adapter", default=None,
                   help="the FT condition's PEFT adapter folder (finetune.py --out); '{task}' is replaced by the task "
                        "name; omitted and circuits.adapter empty: no FT condition (circuits.adapter)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to analyse (circuits.tasks)")
    p.add_argument("--split", choices=["pattern", "control"], default=None,
                   help="test split of the clean items (circuits.split)")
    p.add_argument("--n-items", type=int, default=None, help="clean/corrupted pairs per task (circuits.n_items)")
    p.add_argument("--shots", type=int, default=None, help="demonstrations in the ICL condition (circuits.shots)")
    p.add_argument("--demo-seed", type=int, default=None, help="the ICL condition's demo set (circuits.demo_seed)")
    p.add_argument("--corruption", choices=list(CORRUPTIONS), default=None,
                   help="answer: edit what the answer is read from; control: expression's Z edited, the control "
                        "twin (circuits.corruption)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="attribution (fast, first-order), activation (exact, one pass per component) or both "
                        "(circuits.method)")
    p.add_argument("--activation-items", type=int, default=None,
                   help="with --method attribution, also exact-patch the first N pairs to check the approximation "
                        "(circuits.activation_items)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="patched copies per forward pass in activation patching (circuits.batch_size)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples over items (circuits.bootstrap)")
    p.add_argument("--top-k", type=int, default=None, help="components in the top-k overlap (circuits.top_k)")
    p.add_argument("--seed", type=int, default=None, help="seeds the corruption edits and the bootstrap (circuits.seed)")
    p.add_argument("--dtype", default=None,
                   help="fp32 | bf16 | fp16 | auto: the analysis' precision (circuits.dtype, default fp32: bf16 "
                        "logits are too coarse for small patching effects)")
    p.add_argument("--data", default="data", help="the generated data folder (generate_data.py --out)")
    p.add_argument("--out", default=None, help="results folder; default results/circuits/<model>")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    config = cli.resolve(args, {
        "model": args.model, "circuits.dtype": args.dtype,
        "circuits.adapter": args.adapter,
        "circuits.tasks": parse_task_list(args.tasks) if args.tasks else None,
        "circuits.split": args.split, "circuits.n_items": args.n_items, "circuits.shots": args.shots,
        "circuits.demo_seed": args.demo_seed, "circuits.corruption": args.corruption, "circuits.method": args.method,
        "circuits.activation_items": args.activation_items, "circuits.batch_size": args.batch_size,
        "circuits.bootstrap": args.bootstrap, "circuits.top_k": args.top_k, "circuits.seed": args.seed,
    })
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data}: no such folder; generate it with `python generate_data.py --out {args.data}`")
    out = Path(args.out) if args.out else Path("results/circuits") / slug(config["model"])
    result = analyze(config, args.data, out, show_progress=not args.quiet, argv=sys.argv)
    print(report_section(result))
    print(f"wrote {out}/circuits.json, scores.jsonl, circuits.md, plots/ in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
