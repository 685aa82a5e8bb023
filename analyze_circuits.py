#!/usr/bin/env python
"""Circuit shift: attribute the answer to every attention head and MLP, base vs ICL vs fine-tuned.

Conditions: base zero-shot, base + k demonstrations (ICL) and base + fine-tuned adapter (FT).

Clean = a test item, corrupted = a minimal edit of it that changes the answer's first token (same
token length); metric = logit difference between the two answers' first tokens; attribution patching
(gradient x activation difference) and/or exact activation patching; shift = distance of the ICL and FT
maps from the base map (1 - cosine, normalised L1, top-k overlap) with bootstrap intervals. See
README.md, "Circuit shift", for the method and every choice.

Writes DIR/config.json, DIR/scores.jsonl (one row per task x condition x pair), DIR/circuits.json,
DIR/circuits.md and DIR/plots/<task>/*.png. Needs the generated data (generate_data.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from iclvsft import cli
from iclvsft.errors import ConfigError
from iclvsft.io import slug


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0], {
        "--model": "model", "--adapter": "circuits.adapter", "--tasks": "circuits.tasks", "--split": "circuits.split",
        "--n-items": "circuits.n_items", "--shots": "circuits.shots", "--demo-seed": "circuits.demo_seed",
        "--corruption": "circuits.corruption", "--method": "circuits.method",
        "--activation-items": "circuits.activation_items", "--batch-size": "circuits.batch_size",
        "--bootstrap": "circuits.bootstrap", "--top-k": "circuits.top_k", "--seed": "circuits.seed",
        "--dtype": "circuits.dtype"})
    p.add_argument("--data", default="data", help="the generated data folder (generate_data.py --out)")
    p.add_argument("--out", default=None, help="results folder; default results/circuits/<model>")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_intermixed_args()  # overrides may come before or after the named options
    from iclvsft.circuits import analyze, report_section  # heavy imports only after --help

    config = cli.resolve(args)
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data}: no such folder; generate it with `python generate_data.py --out {args.data}`")
    out = Path(args.out) if args.out else Path("results/circuits") / slug(config["model"])
    result = analyze(config, args.data, out, show_progress=not args.quiet, argv=sys.argv)
    print(report_section(result))
    print(f"wrote {out}/circuits.json, scores.jsonl, circuits.md, plots/ in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
