#!/usr/bin/env python
"""Fine-tune a model (LoRA or full) on the first N pattern rows of one task or several mixed.

Writes to --out: the adapter (LoRA) or the full model (safetensors), the tokenizer, run_config.json,
train_log.jsonl and, last, summary.json. Rerunning into an unfinished --out resumes from its last
checkpoint; a finished one is refused unless --overwrite. Evaluate the result zero-shot with
`python test.py --adapter DIR` (LoRA) or `python test.py --model DIR` (full).
"""
from __future__ import annotations

import argparse
import sys

from iclvsft import cli

EPILOG = """\
examples:
  python finetune.py --task expression --n-train 256 --out runs/ft-expression-256
  python finetune.py --config configs/ft_authors.yaml --out runs/ft-authors      # the authors' protocol
  python finetune.py --task expression,relation --method full ft.learning_rate=1.0e-5 ft.max_steps=100

multi-device: the same command under accelerate (ft.batch_size stays the effective batch):
  accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 finetune.py --task code ...
  accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml finetune.py --method full ...
  (see configs/accelerate/README.md, including 7B)
"""


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0], {"--model": "model", "--task": "ft.tasks", "--n-train": "ft.n_train",
                                             "--method": "ft.method"})
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/ft-<tasks>-<N>-<method>)")
    p.add_argument("--data", default="data", help="the generated data folder (generate_data.py --out)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (an unfinished one is resumed without this)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_intermixed_args()  # overrides may come before or after the named options

    from iclvsft.train import finetune  # heavy imports only after --help

    config = cli.resolve(args)
    result = finetune(config, args.out, args.data, overwrite=args.overwrite, show_progress=not args.quiet)
    summary = result.summary
    if result.trainer is None or result.trainer.is_world_process_zero():
        print(f"{summary['method']} on {','.join(summary['tasks'])} ({summary['data']['rows']} rows): "
              f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}, {summary['train_seconds']:.0f} s "
              f"training, {summary['tokens_per_second']:.0f} tokens/s -> {result.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
