#!/usr/bin/env python
"""Evaluate a model on the test items: zero-shot, k-shot ICL, or a fine-tuned adapter zero-shot.

Writes DIR/samples.jsonl (one row per item x condition), DIR/metrics.json and DIR/table.md.
Rerunning into the same DIR continues where it stopped (--overwrite starts it again); with --config
and no --data, the data is read from data/<config name>. Under `accelerate launch` the items are
split across processes and gathered on the main one.
"""
from iclvsft import cli
from iclvsft.commands import test_main  # the command itself (also `iclvsft test`)

if __name__ == "__main__":
    cli.run(test_main)
