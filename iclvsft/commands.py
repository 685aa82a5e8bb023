"""The commands behind the top-level scripts and the ``iclvsft`` entry point.

Each ``*_main(argv=None, prog=None)`` parses ``argv`` (default ``sys.argv[1:]``) with exactly the
options of its script and returns the exit status; run it under :func:`iclvsft.cli.run` for the
one-line errors::

    generate_data.py     / iclvsft generate    generate_main
    finetune.py          / iclvsft finetune    finetune_main
    test.py              / iclvsft test        test_main
    reproduce.py         / iclvsft reproduce   reproduce_main
    analyze_circuits.py  / iclvsft circuits    circuits_main

Shared rules (one place, so every command agrees):

* ``--config`` takes a YAML file or the name of a preset shipped in the package (``cpu``,
  ``quick``, ``paper``, ``ladder``, ``ft_authors``: :data:`CONFIG_DIR`); ``configs/<name>.yaml`` that
  does not exist where the command runs (outside a checkout) is the shipped preset of that name.
* The data folder defaults to ``data/<config name>`` when ``--config`` is given (what reproduce.py
  uses), else ``data``.

Heavy imports (torch, transformers) happen only after the options are parsed, so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import cli, writers
from .config import Config
from .errors import ConfigError, IclvsftError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# How the user started each command: the script, or the entry point's subcommand.
SCRIPTS = {"generate": "generate_data.py", "finetune": "finetune.py", "test": "test.py",
           "reproduce": "reproduce.py", "circuits": "analyze_circuits.py"}


def presets() -> list[str]:
    """The names of the shipped presets (``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(value: str | None) -> str | None:
    """``--config`` as a file to load: an existing file as given; otherwise a shipped preset named
    ``value`` (``cpu`` or ``cpu.yaml``), or ``configs/<file>`` read from the shipped configs (the
    package's copy of the checkout's ``configs/``). Anything else is a one-line error that lists the
    presets."""
    if value is None or Path(value).is_file():
        return value
    path = Path(value)
    candidates = []
    if len(path.parts) == 1:
        candidates.append(CONFIG_DIR / value)
        if not path.suffix:
            candidates.append(CONFIG_DIR / f"{value}.yaml")
    elif not path.is_absolute() and path.parts[0] == "configs":
        candidates.append(CONFIG_DIR.joinpath(*path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"config file {value} not found; pass a YAML file or a shipped preset's name: "
                      f"{', '.join(presets())} (e.g. --config quick; they are in {CONFIG_DIR})")


def default_data_dir(args: argparse.Namespace, config: Config, dest: str = "data") -> Path:
    """The data folder: the option when given, else ``data/<config name>`` with ``--config`` (what
    reproduce.py uses, so ``test.py --config configs/quick.yaml`` reads the data reproduce.py made for
    that preset), else ``data``."""
    given = getattr(args, dest, None)
    if given:
        return Path(given)
    if args.config is not None and config.name:
        return Path("data") / config.name
    return Path("data")


DATA_DEFAULT = "default: data/<config name> with --config (as reproduce uses), else data"


def _parser(description: str, prog: str | None, config_flags: dict[str, str] | None = None) -> argparse.ArgumentParser:
    p = cli.parser(description, config_flags)
    if prog:
        p.prog = prog
    for action in p._actions:
        if action.dest == "config":
            action.help = (f"a config file, or a shipped preset's name ({', '.join(presets())}); built-in defaults "
                           "when omitted")
    return p


def _parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = p.parse_intermixed_args(None if argv is None else list(argv))  # overrides before or after options
    args.config_given, args.config = args.config, resolve_config_path(args.config)  # as typed, as loaded
    return args


def _doc(fn: Callable) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


def _command(name: str, prog: str | None) -> str:
    """How to run command ``name`` the way this one was run: ``iclvsft generate`` or ``python generate_data.py``."""
    return f"iclvsft {name}" if prog and prog.startswith("iclvsft") else f"python {SCRIPTS[name]}"


def _clear_folder(out: Path, allowed: set[str], marker: str, what: str) -> None:
    """Check that ``out`` is a folder ``what`` wrote (it holds ``marker`` and nothing but ``allowed``
    entries, or is empty); raises ConfigError otherwise. Read-only: the caller deletes."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file; choose a folder")
    entries = {p.name for p in writers.entries(out)}
    foreign = sorted(e for e in entries - allowed if not (e.startswith(".") and e.endswith(".tmp")))
    if entries and (marker not in entries or foreign):
        raise ConfigError(f"--overwrite: {out} is not a {what} folder (it holds "
                          f"{', '.join(foreign[:5]) or 'no ' + marker}), so it is left alone; choose another folder")


# ------------------------------------------------------------------------------------------- generate

def generate_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Generate the six implicit-pattern datasets: <out>/<task>/{train,test}.jsonl and <out>/manifest.json.

    Same arguments, same bytes. An existing folder generated with other settings is never
    overwritten unless --force (or --overwrite) is given.
    """
    p = _parser(_doc(generate_main), prog, {"--tasks": "data.tasks", "--seed": "data.seed"})
    p.add_argument("--out", "--data", dest="out", default=argparse.SUPPRESS, help=f"output folder ({DATA_DEFAULT})")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace a folder generated with other settings (--overwrite is the same option)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = _parse(p, argv)
    from .data import generate, is_up_to_date

    config = cli.resolve(args)
    out = default_data_dir(args, config, dest="out")
    writers.check_folder(out, "--out")
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


# ------------------------------------------------------------------------------------------- finetune

FINETUNE_EPILOG = """\
examples:
  {cmd} --task expression --n-train 256 --out runs/ft-expression-256
  {cmd} --config {authors} --out runs/ft-authors      # the authors' protocol
  {cmd} --task expression,relation --method full ft.learning_rate=1.0e-5 ft.max_steps=100

multi-device: the same command under accelerate (ft.batch_size stays the effective batch):
  accelerate launch --config_file {configs}/accelerate/ddp.yaml --num_processes 4 {launch} --task code ...
  accelerate launch --config_file {configs}/accelerate/deepspeed_zero3.yaml {launch} --method full ...
  (see {configs}/accelerate/README.md, including 7B)
"""


def finetune_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Fine-tune a model (LoRA or full) on the first N pattern rows of one task or several mixed.

    Writes to --out: the adapter (LoRA) or the full model (safetensors), the tokenizer,
    run_config.json, train_log.jsonl and, last, summary.json. Rerunning into an unfinished --out
    resumes from its last checkpoint; a finished one is refused unless --overwrite.
    """
    p = _parser(_doc(finetune_main), prog, {"--model": "model", "--task": "ft.tasks", "--n-train": "ft.n_train",
                                            "--method": "ft.method"})
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    installed = _command("finetune", prog).startswith("iclvsft")
    p.epilog = FINETUNE_EPILOG.format(cmd=_command("finetune", prog),
                                       authors="ft_authors" if prog else "configs/ft_authors.yaml",
                                       launch="-m iclvsft finetune" if installed else "finetune.py",
                                       configs='"$(iclvsft configs)"' if installed else "configs")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/ft-<tasks>-<N>-<method>)")
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help=f"the generated data folder ({_command('generate', prog)} --out); {DATA_DEFAULT}")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (an unfinished one is resumed without this)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = _parse(p, argv)

    from .train import finetune  # heavy imports only after --help

    config = cli.resolve(args)
    data = default_data_dir(args, config)
    writers.check_folder(data, "--data")
    if args.out is not None:
        writers.check_folder(args.out, "--out")
    result = finetune(config, args.out, str(data), overwrite=args.overwrite, show_progress=not args.quiet)
    summary = result.summary
    if result.trainer is None or result.trainer.is_world_process_zero():
        print(f"{summary['method']} on {','.join(summary['tasks'])} ({summary['data']['rows']} rows): "
              f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}, {summary['train_seconds']:.0f} s "
              f"training, {summary['tokens_per_second']:.0f} tokens/s -> {result.out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- test

EVAL_FILES = {"run.json", "samples.jsonl", "metrics.json", "table.md"}


def test_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Evaluate a model on the test items: zero-shot, k-shot ICL, or a fine-tuned adapter zero-shot.

    Writes DIR/samples.jsonl (one row per item x condition), DIR/metrics.json and DIR/table.md.
    Rerunning into the same DIR continues where it stopped (--overwrite starts it again). Under
    `accelerate launch` the items are split across processes and gathered on the main one.
    """
    p = _parser(_doc(test_main), prog, {
        "--model": "model", "--tasks": "eval.tasks", "--shots": "eval.shots", "--demo-seeds": "eval.demo_seeds",
        "--demo-mode": "eval.demo_mode", "--limit": "eval.limit", "--batch-size": "eval.batch_size",
        "--dtype": "dtype"})
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder from finetune.py, loaded on top of --model")
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help=f"the generated data folder ({_command('generate', prog)} --out); {DATA_DEFAULT}")
    p.add_argument("--out", default=None,
                   help="results folder; default results/eval/<model>[__<adapter>]")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results already in --out (a test.py folder) and evaluate again; without it a "
                        "rerun continues the same run and a run with other settings is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = _parse(p, argv)
    config = cli.resolve(args)
    if args.adapter and not Path(args.adapter).is_dir():
        raise ConfigError(f"--adapter {args.adapter}: no such folder (finetune.py --out writes one)")

    import torch
    from accelerate import PartialState

    from .evaluate import EvalPlan, evaluate
    from .io import slug

    out = Path(args.out) if args.out else Path("results/eval") / (
        slug(config.model) + (f"__{slug(args.adapter)}" if args.adapter else ""))
    data = default_data_dir(args, config)
    writers.check_folder(data, "--data")
    writers.check_folder(out, "--out")
    state = PartialState(cpu=not torch.cuda.is_available())  # the state evaluate() uses
    with _worded_errors({"move_folder": "move that folder away, or pass --overwrite to replace it"}), \
            writers.writing(out, state):  # held from the clearing to the last row
        if args.overwrite:
            _clear_folder(out, EVAL_FILES, "run.json", "test.py results")  # on every process: all refuse together
            if state.is_main_process:
                writers.clear_folder(out)
            state.wait_for_everyone()
        metrics = evaluate(EvalPlan(config, data, out, config.model, args.adapter), show_progress=not args.quiet)
    if state.is_main_process:
        print((out / "table.md").read_text())
        print(f"wrote {out}/samples.jsonl, metrics.json, table.md ({len(metrics['cells'])} cells)")
    return 0


test_main.__test__ = False  # a command, not a pytest test, wherever a test module imports it


# ------------------------------------------------------------------------------------------ reproduce

RESULTS_ENTRIES = {"config.json", "icl", "ft", "ft_eval", "circuits", "ladder", "plots", "report.md", "summary.json",
                   "timings.json"}
# The shared stages' remedies, worded for reproduce.py: its folder is --results (every stage writes
# under it) and --overwrite reruns the whole study.
STUDY_OVER = "pass --overwrite to rerun the whole study from scratch"
REPRODUCE_WORDS = {
    "another_out": "choose another --results",
    "another_results": "choose another --results",
    "overwrite_train": STUDY_OVER,
    "overwrite_start": STUDY_OVER,
    "move_run": f"move that run away to train it again, or {STUDY_OVER}",
    "another_data": "pass another --data folder, or --overwrite to regenerate it and rerun the study",
}


def reproduce_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the whole study for one config: data, ICL sweep, FT sweep, FT evaluation, report.

    Writes results/<config name>/report.md (plus summary.json, plots/, and one folder per stage) and
    prints the headline table. Resumable: kill it at any moment and rerun the same command; finished
    cells and fine-tuning runs are reused, unfinished ones continue. With --plan (or --dry-run) it
    only prints every cell and run with its estimated peak memory and time against this machine's
    memory (or the --plan-* one), and what would fit where a run does not.
    """
    p = _parser(_doc(reproduce_main), prog)
    p.add_argument("--data", default=None, help="the data folder; default data/<config name>")
    p.add_argument("--results", default=None, help="the results folder; default results/<config name>")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete --results (a reproduce folder) and regenerate --data if it holds data "
                        "made with other settings; without it finished work is reused and other settings refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                   help="print every ICL cell and FT run the config implies, with estimated peak memory and time "
                        "against this machine's memory (or the --plan-* machine), and what would fit where a run "
                        "does not; exit without doing any work")
    p.add_argument("--plan-gpus", type=int, default=None, metavar="N",
                   help="with --plan: plan for N GPUs (0: CPU only) instead of this machine's")
    p.add_argument("--plan-gpu-gib", type=float, default=None, metavar="GIB",
                   help="with --plan: memory of each planned GPU in GiB (default: what this machine's GPU has free)")
    p.add_argument("--plan-host-gib", type=float, default=None, metavar="GIB",
                   help="with --plan: host RAM in GiB (default: this machine's; CPU runs and ZeRO-3 offload use it)")
    args = _parse(p, argv)
    config = cli.resolve(args)
    name = config.name or "default"
    data, results = Path(args.data or f"data/{name}"), Path(args.results or f"results/{name}")
    writers.check_folder(data, "--data")
    writers.check_folder(results, "--results")

    stated = [flag for flag, value in (("--plan-gpus", args.plan_gpus), ("--plan-gpu-gib", args.plan_gpu_gib),
                                       ("--plan-host-gib", args.plan_host_gib)) if value is not None]
    if stated and not args.plan:
        raise ConfigError(f"{', '.join(stated)}: only with --plan (the --plan-* options describe a machine to plan "
                          "for; a real run plans for the machine it runs on)")
    if args.plan:
        from .plan import Invocation, detect_machine, plan_study, render_plan

        machine = detect_machine(args.plan_gpus, args.plan_gpu_gib, args.plan_host_gib)
        how = Invocation(args.config_given, data, tuple(args.overrides))
        print(render_plan(plan_study(config, machine, results, how)), end="")
        return 0

    from .study import run_study

    with _worded_errors(REPRODUCE_WORDS, out_flag="--results"), writers.writing(results):
        if args.overwrite:
            _clear_folder(results, RESULTS_ENTRIES, "config.json", "reproduce results")
            from .data import generate, is_up_to_date

            if (data / "manifest.json").exists() and not is_up_to_date(config, data):
                generate(config, data, show_progress=not args.quiet)
            writers.clear_folder(results)
        report = run_study(config, data, results, show_progress=not args.quiet)
    print(report.headline)
    print(f"wrote {report.path}")
    return 0


# ------------------------------------------------------------------------------------------- circuits

CIRCUITS_ENTRIES = {"config.json", "scores.jsonl", "circuits.json", "circuits.md", "plots"}


def circuits_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Circuit shift: attribute the answer to every attention head and MLP, base vs ICL vs fine-tuned.

    Writes DIR/config.json, DIR/scores.jsonl, DIR/circuits.json, DIR/circuits.md and
    DIR/plots/<task>/*.png. Needs the generated data. A finished DIR made with other settings is
    refused unless --overwrite.
    """
    p = _parser(_doc(circuits_main), prog, {
        "--model": "model", "--adapter": "circuits.adapter", "--tasks": "circuits.tasks", "--split": "circuits.split",
        "--n-items": "circuits.n_items", "--shots": "circuits.shots", "--demo-seed": "circuits.demo_seed",
        "--corruption": "circuits.corruption", "--method": "circuits.method",
        "--activation-items": "circuits.activation_items", "--batch-size": "circuits.batch_size",
        "--bootstrap": "circuits.bootstrap", "--top-k": "circuits.top_k", "--seed": "circuits.seed",
        "--dtype": "circuits.dtype"})
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help=f"the generated data folder ({_command('generate', prog)} --out); {DATA_DEFAULT}")
    p.add_argument("--out", default=None, help="results folder; default results/circuits/<model>")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in --out (an analyze_circuits.py folder); without it a finished folder "
                        "made with other settings is refused (with the same settings it is computed again)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = _parse(p, argv)
    from .circuits import analyze, report_section  # heavy imports only after --help
    from .io import slug

    config = cli.resolve(args)
    data = default_data_dir(args, config)
    writers.check_folder(data, "--data")
    if not data.is_dir():
        how = _command("generate", prog) + (f" --config {args.config_given}" if args.config_given else "")
        raise ConfigError(f"--data {data}: no such folder; generate it with `{how} --out {data}`")
    out = Path(args.out) if args.out else Path("results/circuits") / slug(config.model)
    with writers.writing(out):  # held from the clearing to the last file
        if args.overwrite:
            _clear_folder(out, CIRCUITS_ENTRIES, "config.json", "analyze_circuits.py results")
            writers.clear_folder(out)
        result = analyze(config, str(data), out, show_progress=not args.quiet, argv=sys.argv)
    print(report_section(result))
    print(f"wrote {out}/circuits.json, scores.jsonl, circuits.md, plots/ in {result['wall_seconds']:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------------- errors

@contextmanager
def _worded_errors(words: dict[str, str], out_flag: str = "--out") -> Iterator[None]:
    """Re-raise a project error with its remedies worded by ``words`` and its output folder named by
    ``out_flag`` (see :class:`iclvsft.errors.IclvsftError`); with an ``out_flag`` other than --out, a
    file-system error that :func:`iclvsft.cli.run` would explain with "--out" names ``out_flag``."""
    try:
        yield
    except IclvsftError as e:
        e.reword(words, out_flag)
        raise
    except OSError as e:
        remedy = cli.FILE_SYSTEM_ERRORS.get(e.errno) if out_flag != "--out" else None
        if remedy is None:
            raise
        remedy = remedy.replace("--out", out_flag)
        raise ConfigError(f"cannot write or read {e.filename or 'a file'}: {e.strerror} ({remedy}); "
                          "finished work is kept, rerun to continue") from None


__all__ = ["CONFIG_DIR", "circuits_main", "default_data_dir", "finetune_main", "generate_main", "presets",
           "reproduce_main", "resolve_config_path", "test_main"]
