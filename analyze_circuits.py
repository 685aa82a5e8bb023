#!/usr/bin/env python
"""Circuit shift: attribute the answer to every attention head and MLP, base vs ICL vs fine-tuned.

Conditions: base zero-shot, base + k demonstrations (ICL) and base + fine-tuned adapter (FT).

Clean = a test item, corrupted = a minimal edit of it that changes the answer's first token (same
token length); metric = logit difference between the two answers' first tokens; attribution patching
(gradient x activation difference) and/or exact activation patching; shift = distance of the ICL and FT
maps from the base map (1 - cosine, normalised L1, top-k overlap) with bootstrap intervals. See
docs/circuits.md for the method and every choice.

Writes DIR/config.json, DIR/scores.jsonl (one row per task x condition x pair), DIR/circuits.json,
DIR/circuits.md and DIR/plots/<task>/*.png. Needs the generated data (generate_data.py).
"""
from iclvsft import cli
from iclvsft.commands import circuits_main  # the command itself (also `iclvsft circuits`)

if __name__ == "__main__":
    cli.run(circuits_main)
