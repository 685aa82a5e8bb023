"""What the top-level scripts share: --config, KEY=VALUE overrides, and clean error exits."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from .config import load_config
from .errors import IclvsftError

OVERRIDES_HELP = ("config overrides as dotted KEY=VALUE pairs, values parsed as YAML, applied after --config "
                  "and before the named options, e.g. data.seed=3 'data.tasks=[expression,code]' "
                  "data.task_params.expression.z_terms=[2,3]")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="YAML", default=None,
                   help="a config file, e.g. configs/cpu.yaml; built-in defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return p


def resolve(args: argparse.Namespace, named: dict[str, Any]) -> dict:
    """Config = defaults < --config file < KEY=VALUE overrides < named options that were given."""
    extra = [{k.split(".")[0]: _nest(k.split(".")[1:], v)} for k, v in named.items() if v is not None]
    return load_config(args.config, [*args.overrides, *extra])


def _nest(keys: list[str], value: Any) -> Any:
    for key in reversed(keys):
        value = {key: value}
    return value


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main; a project error prints one line and exits 2 instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main() or 0)
    except IclvsftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
