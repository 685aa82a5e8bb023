"""What the top-level scripts share: --config, KEY=VALUE overrides, options derived from the config
schema, and clean error exits."""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from .config import DEFAULTS, Config, load_config, nest, schema_field
from .errors import IclvsftError
from .io import shows_bars

OVERRIDES_HELP = ("config overrides as dotted KEY=VALUE pairs, values parsed as YAML, applied after --config "
                  "and before the named options, e.g. data.seed=3 'data.tasks=[expression,code]' "
                  "data.task_params.expression.z_terms=[2,3]")


def parser(description: str, config_flags: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """A script's parser with --config, KEY=VALUE overrides and one option per entry of
    ``config_flags`` (``{"--n-items": "circuits.n_items"}``): type, choices and help come from the
    schema (:mod:`iclvsft.config`), so no script restates them."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="YAML", default=None,
                   help="a config file, e.g. configs/cpu.yaml; built-in defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    for flag, key in (config_flags or {}).items():
        add_config_flag(p, flag, key)
    return p


def _default(key: str) -> Any:
    value: Any = DEFAULTS
    for part in key.split("."):
        value = value[part]
    return value


def _comma_list(flag: str, of_int: bool) -> Callable[[str], list]:
    def parse(text: str) -> list:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        if not of_int:
            return parts
        try:
            return [int(x) for x in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, e.g. 0,4,16; got {text!r}") from None
    return parse


def add_config_flag(p: argparse.ArgumentParser, flag: str, key: str) -> None:
    """``flag`` sets config key ``key``; given on the command line, it wins over --config and overrides."""
    f, default = schema_field(key), _default(key)
    # default SUPPRESS: absent from the namespace unless given (so the config decides), and the help
    # states the schema's default instead of argparse's "None".
    help_text = f"{f.metadata['help']} (config key {key}; default {default!r})".replace("%", "%%")
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": "config:" + key,
                              "metavar": key.split(".")[-1].upper(), "help": help_text}
    if isinstance(default, list):
        kwargs["type"] = _comma_list(flag, bool(default) and all(isinstance(v, int) for v in default))
        kwargs["metavar"] = "A,B,..."
    elif isinstance(default, bool):
        raise ValueError(f"{key}: boolean keys are set with {key}=true|false, not a flag")
    elif isinstance(default, (int, float)):
        kwargs["type"] = type(default)
    if f.metadata.get("choices"):
        kwargs["choices"] = list(f.metadata["choices"])
        kwargs.pop("metavar")
    p.add_argument(flag, **kwargs)


def resolve(args: argparse.Namespace) -> Config:
    """Config = defaults < --config file < KEY=VALUE overrides < the config options that were given."""
    named = {k.removeprefix("config:"): v for k, v in vars(args).items() if k.startswith("config:") and v is not None}
    extra = [nest(k, v) for k, v in named.items()]
    return load_config(args.config, [*args.overrides, *extra])


FILE_SYSTEM_ERRORS = {errno.EACCES: "choose a folder you can write, e.g. another --out",
                      errno.EPERM: "choose a folder you can write, e.g. another --out",
                      errno.EROFS: "the file system is read-only: choose another --out",
                      errno.ENOSPC: "the disk is full: free space",
                      errno.EDQUOT: "the disk quota is full: free space"}


INTERRUPTED = "interrupted; rerun the same command to continue"
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")  # warnings only at import: see run()


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main; a project error prints one line and exits 2 instead of a traceback, Ctrl-C
    prints one line (:data:`INTERRUPTED`) and exits 130 (128 + SIGINT, what a shell reports for it).

    Logging: INFO from the main process only (under ``accelerate launch`` the others log warnings),
    so a line is not repeated once per process; library progress bars stay off when stderr is not a
    terminal (a log file gets plain lines from ours, :func:`iclvsft.io.progress`)."""
    main_process = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # torchao (ft.optimizer adamw_torch_8bit / _4bit) is imported by transformers whenever it is installed;
    # without CUDA its import warns for each GPU kernel library it cannot load, and torch's pytree for
    # two of its enums: noise on every command, whatever the optimizer
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not shows_bars():
        with contextlib.suppress(ImportError):
            import transformers

            transformers.utils.logging.disable_progress_bar()
    try:
        sys.exit(main() or 0)
    except KeyboardInterrupt:  # Ctrl-C: what was finished is on disk (every writer resumes), so no traceback
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except IclvsftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the environment, not the code: one line that names the file and what to do
        if e.errno not in FILE_SYSTEM_ERRORS:
            raise
        print(f"error: cannot write or read {e.filename or 'a file'}: {e.strerror} ({FILE_SYSTEM_ERRORS[e.errno]}); "
              "finished work is kept, rerun to continue", file=sys.stderr)
        sys.exit(2)


__all__ = ["OVERRIDES_HELP", "add_config_flag", "parser", "resolve", "run"]
