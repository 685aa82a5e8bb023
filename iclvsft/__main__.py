"""``iclvsft <command> [options]`` (the console entry point; also ``python -m iclvsft``).

Each command takes exactly the options of its script (``iclvsft test --help`` = ``test.py --help``).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence

from . import __version__, cli

# command -> (module, function, summary). Modules are imported only for the command that runs.
COMMANDS = {
    "generate": ("iclvsft.commands", "generate_main", "generate the datasets (generate_data.py)"),
    "finetune": ("iclvsft.commands", "finetune_main", "fine-tune a model, LoRA or full (finetune.py)"),
    "test": ("iclvsft.commands", "test_main", "evaluate zero-shot, k-shot ICL or an adapter (test.py)"),
    "reproduce": ("iclvsft.commands", "reproduce_main", "the whole study for a config (reproduce.py)"),
    "circuits": ("iclvsft.commands", "circuits_main", "circuit shift, base vs ICL vs FT (analyze_circuits.py)"),
    "export-lm-eval": ("iclvsft.lm_eval_export", "main", "export the tasks for lm-evaluation-harness"),
    "models": ("iclvsft.models.__main__", "main", "prepare offline models (python -m iclvsft.models)"),
    "configs": (__name__, "configs_main", "print the folder of the shipped configs and their names"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: iclvsft <command> [options]   (iclvsft <command> --help: the command's options)", "",
             "In-context learning vs fine-tuning on implicit-pattern tasks (Yin et al., EMNLP 2024 Findings).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "Every command takes --config (a YAML file or a shipped preset: cpu, quick, paper, ...) and "
              "KEY=VALUE overrides;", "errors print one line and exit with status 2."]
    return "\n".join(lines)


def configs_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Print the shipped configs' folder (e.g. for `accelerate launch --config_file <it>/accelerate/ddp.yaml`)
    and the preset names that --config accepts."""
    from .commands import CONFIG_DIR, presets

    if argv and any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog or 'iclvsft configs'}\n\n{inspect.cleandoc(configs_main.__doc__ or '')}")
        return 0
    print(CONFIG_DIR)
    print("presets: " + ", ".join(presets()), file=sys.stderr)
    return 0


def _call(function, argv: list[str], prog: str) -> int | None:
    """Call a command function with ``argv``: ``f(argv, prog=...)``, ``f(argv)``, or ``f()`` with
    ``sys.argv`` set (a module whose main parses sys.argv itself)."""
    params = inspect.signature(function).parameters
    if "prog" in params:
        return function(argv, prog=prog)
    if params:
        return function(argv)
    old = sys.argv
    sys.argv = [prog, *argv]
    try:
        return function()
    finally:
        sys.argv = old


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"iclvsft {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module_name, function_name, _ = COMMANDS[name]
    if name != "configs" and importlib.util.find_spec(module_name) is None:
        print(f"error: `iclvsft {name}` is not available in this installation ({module_name} is missing); "
              "install a version of iclvsft that has it", file=sys.stderr)
        sys.exit(2)
    if name == "configs":
        function = configs_main
    else:
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except ModuleNotFoundError as e:  # a package the command needs (e.g. an optional one) is absent
            if not e.name or e.name.split(".")[0] == "iclvsft":
                raise
            print(f"error: `iclvsft {name}` needs the package {e.name.split('.')[0]!r}, which is not installed; "
                  f"install it (pip install {e.name.split('.')[0]})", file=sys.stderr)
            sys.exit(2)
    cli.run(lambda: _call(function, rest, f"iclvsft {name}"))


if __name__ == "__main__":
    main()
