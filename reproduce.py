#!/usr/bin/env python
"""Run the whole study for one config: data, ICL sweep, FT sweep, FT evaluation, report.

Writes results/<config name>/report.md (plus summary.json, plots/, and one folder per stage) and
prints the headline table. Resumable: kill it at any moment and rerun the same command; finished
cells and fine-tuning runs are reused, unfinished ones continue; --overwrite starts the study over.
"""
from iclvsft import cli
from iclvsft.commands import reproduce_main  # the command itself (also `iclvsft reproduce`)

if __name__ == "__main__":
    cli.run(reproduce_main)
