#!/usr/bin/env python
"""Run the whole study for one config (data, ICL sweep, FT sweep, evaluation, report).

Not built yet: the end-to-end issue builds it on top of test.py and finetune.py. For now it only
generates the config's data, so `make reproduce` fails loudly instead of pretending.
"""
from __future__ import annotations

from pathlib import Path

from iclvsft import cli
from iclvsft.data import generate, is_up_to_date
from iclvsft.errors import IclvsftError


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default="data", help="the generated data folder")
    args = p.parse_args()
    config = cli.resolve(args, {})
    if not is_up_to_date(config, args.data):
        if (Path(args.data) / "manifest.json").exists():
            raise IclvsftError(f"{args.data} holds data made with other settings; use another --data folder")
        generate(config, args.data)
    raise IclvsftError("reproduce.py: data is ready, but the evaluation / fine-tuning / report stages are not "
                       "implemented yet (see the open issues); nothing else was run")


if __name__ == "__main__":
    cli.run(main)
