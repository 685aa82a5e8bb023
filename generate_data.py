#!/usr/bin/env python
"""Generate the six implicit-pattern datasets: <out>/<task>/{train,test}.jsonl and <out>/manifest.json.

Same arguments, same bytes. An existing folder generated with other settings is never overwritten
unless --force (or --overwrite) is given. With --config and no --out: data/<config name>.
"""
from iclvsft import cli
from iclvsft.commands import generate_main  # the command itself (also `iclvsft generate`)

if __name__ == "__main__":
    cli.run(generate_main)
