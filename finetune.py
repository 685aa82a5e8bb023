#!/usr/bin/env python
"""Fine-tune a model (LoRA or full) on the first N pattern rows of one task or several mixed.

Writes to --out: the adapter (LoRA) or the full model (safetensors), the tokenizer, run_config.json,
train_log.jsonl and, last, summary.json. Rerunning into an unfinished --out resumes from its last
checkpoint; a finished one is refused unless --overwrite. Evaluate the result zero-shot with
`python test.py --adapter DIR` (LoRA) or `python test.py --model DIR` (full).
"""
from iclvsft import cli
from iclvsft.commands import finetune_main  # the command itself (also `iclvsft finetune`)

if __name__ == "__main__":
    cli.run(finetune_main)
