#!/usr/bin/env python
"""Run the whole study for one config: data, ICL sweep, FT sweep, FT evaluation, report.

Writes results/<config name>/report.md (plus summary.json, plots/, and one folder per stage) and
prints the headline table. Resumable: kill it at any moment and rerun the same command; finished
cells and fine-tuning runs are reused, unfinished ones continue.
"""
from __future__ import annotations

from pathlib import Path

from iclvsft import cli
from iclvsft.study import run_study


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="the data folder; default data/<config name>")
    p.add_argument("--results", default=None, help="the results folder; default results/<config name>")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_intermixed_args()  # overrides may come before or after the named options
    config = cli.resolve(args)
    name = config["name"] or "default"
    report = run_study(config, Path(args.data or f"data/{name}"), Path(args.results or f"results/{name}"),
                       show_progress=not args.quiet)
    text = report.read_text()
    headline = text[text.index("## Headline"):].split("\n## ", 1)[0] if "## Headline" in text else text
    print(headline)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    cli.run(main)
