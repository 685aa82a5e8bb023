#!/usr/bin/env python
"""Generate the six implicit-pattern datasets: <out>/<task>/{train,test}.jsonl and <out>/manifest.json.

Same arguments, same bytes. An existing folder generated with other settings is never overwritten
unless --force is given.
"""
from __future__ import annotations

from pathlib import Path

from iclvsft import cli
from iclvsft.data import generate, is_up_to_date
from iclvsft.errors import ConfigError


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0], {"--tasks": "data.tasks", "--seed": "data.seed"})
    p.add_argument("--out", "--data", dest="out", default="data", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite a folder generated with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_intermixed_args()  # overrides may come before or after the named options
    config = cli.resolve(args)
    out = Path(args.out)
    if is_up_to_date(config, out):
        print(f"{out}: already holds this data (manifest and sha256 match); nothing to do")
        return 0
    if (out / "manifest.json").exists() and not args.force:
        raise ConfigError(f"{out} holds data generated with other settings; pass --force to replace it "
                          "or choose another --out")
    manifest = generate(config, out, show_progress=not args.quiet)
    for name, entry in manifest["tasks"].items():
        counts = ", ".join(f"{pool} {f['counts']}" for pool, f in entry["files"].items())
        print(f"{name:<10} {counts}  overlap(test, train) = {entry['overlap_test_train']}")
    print(f"wrote {out}/manifest.json")
    return 0


if __name__ == "__main__":
    cli.run(main)
