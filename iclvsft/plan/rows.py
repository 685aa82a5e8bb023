"""The plan itself: rows of ICL cells, FT runs (with their evaluation), ladder rungs and circuit
analyses, each with its estimated peak memory and time against a machine, rendered as markdown; and
the check before a run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, FtConfig
from ..errors import ConfigError
from ..jobs import FTRun, plan_ft, plan_ladder
from ..optimizers import STOCHASTIC_ROUNDING
from ..tasks import get_task
from .estimates import (
    CHAT_TOKENS,
    CPU_OVERHEAD,
    CPU_RATES,
    CUDA_OVERHEAD,
    FIT_FRACTION,
    GPU_RATES,
    HEADER_TOKENS,
    Estimate,
    FTShape,
    _rates,
    accumulation_for,
    compute_dtype,
    eval_memory,
    eval_seconds,
    fits,
    ft_shape,
    load_seconds,
    needed,
    param_bytes,
    task_tokens,
    train_memory,
    train_seconds,
)
from .machine import Machine, detect_machine
from .shapes import GIB, Shape, model_shape

STRATEGY_LABEL = {"cpu": "CPU", "single": "1 GPU", "zero3": "ZeRO-3 x{n}", "zero3_offload": "ZeRO-3 + CPU offload x{n}",
                  "unknown": "?"}
ACCELERATE_FILE = {"zero3": "deepspeed_zero3.yaml", "zero3_offload": "deepspeed_zero3_offload.yaml"}

@dataclass
class PlanRow:
    stage: str  # ICL | FT | circuits | ladder ICL | ladder FT
    model: str
    what: str
    number: int  # how many cells, runs or tasks
    unit: str  # cells | runs | tasks
    strategy: str  # where it runs: cpu | single (one GPU) | zero3 | zero3_offload | unknown
    device_gib: float | None  # estimated peak per device (None: model size unknown)
    host_gib: float | None  # host RAM needed besides (offload)
    seconds: float | None
    fits: bool | None  # None: not estimated
    in_process: bool = True  # reproduce.py can run it itself (one process, one device)
    note: str = ""  # what would fit, or the command that runs it
    runs: list = field(default_factory=list)  # the study.FTRun objects of an FT row
    launch: str = ""  # the launcher command of a run reproduce.py cannot run in-process
    processes: int = 1  # processes of a launched (ZeRO-3) run

    @property
    def count(self) -> str:
        return f"{self.number} {self.unit}"

    @property
    def how(self) -> str:
        return STRATEGY_LABEL[self.strategy].format(n=self.processes)


@dataclass
class Plan:
    config_name: str
    machine: Machine
    rows: list[PlanRow]
    totals: dict[str, int]

    @property
    def problems(self) -> list[PlanRow]:
        return [r for r in self.rows if r.fits is False]

    @property
    def seconds(self) -> float:
        return sum(r.seconds or 0.0 for r in self.rows)


def _short(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def _gib(x: float) -> float:
    return round(x / GIB, 1)


def _items(config: Config, task: str) -> int:
    ev, data = config.eval, config.data
    try:
        splits = get_task(task, data.task_params.get(task)).splits
    except (ConfigError, KeyError):
        splits = ("pattern", "control")
    per_split = {"pattern": data.test_pattern, "control": data.test_control}
    return sum(min(per_split.get(s, 0), ev.limit) if ev.limit else per_split.get(s, 0)
               for s in ev.splits if s in splits)


def _eval_row(config: Config, model: str, shape: Shape | None, task: str, shots: list[int], seeds: list[int],
              machine: Machine, stage: str = "ICL", what: str | None = None) -> PlanRow:
    cells = [(k, _items(config, task)) for k in shots for _ in ([None] if k == 0 else seeds)]
    label = what or f"{task}: k {','.join(map(str, shots))} x demo seeds {','.join(map(str, seeds))}; " \
                    f"{cells[0][1] if cells else 0} items per cell"
    how = "single" if machine.cuda else "cpu"
    if shape is None:
        return PlanRow(stage, model, label, len(cells), "cells", how, None, None, None, None,
                       note="model size unknown here: not estimated")
    dtype = compute_dtype(config, model, machine.cuda)
    nbytes = 4 if dtype == "fp32" else 2
    row_ft, _, answer, demo, query, query_max = task_tokens(task)
    extra = CHAT_TOKENS if config.prompt_style == "chat" else 0
    new_tokens = config.eval.max_new_tokens or answer + 2
    k_max = max(shots) if shots else 0
    context = HEADER_TOKENS + k_max * demo * 1.15 + query_max + extra + new_tokens  # 15%: demos longer than the mean
    per_item = config.eval.demo_mode == "per_item"
    est = eval_memory(shape, weight_bytes=nbytes, batch=config.eval.batch_size, context=context,
                      query=(context if per_item else query_max + extra + new_tokens))
    secs = eval_seconds(shape, cells=cells, query=query + extra, demo=demo, new_tokens=new_tokens,
                        batch=config.eval.batch_size, weight_bytes=nbytes, half=nbytes == 2,
                        cuda=machine.cuda, per_item=per_item) + load_seconds(shape, nbytes, machine.cuda)
    ok = fits(est, machine)
    note = "" if ok else _eval_alternatives(est, machine, config)
    return PlanRow(stage, model, label, len(cells), "cells", how, _gib(est.device), None, secs, ok, note=note)


def _eval_alternatives(est: Estimate, machine: Machine, config: Config) -> str:
    need = needed(est, machine.cuda) / FIT_FRACTION
    where = "a GPU" if machine.cuda else "host RAM"
    return (f"needs ~{need / GIB:.0f} GiB of {where}; would fit: a smaller eval.batch_size (now "
            f"{config.eval.batch_size}), or a device with >= {need / GIB:.0f} GiB")


def _strategies(machine: Machine, ft: FtConfig) -> list[tuple[str, int]]:
    """(strategy, processes) in the order tried: in-process on one device, then ZeRO-3 over the most GPUs
    whose count keeps processes x per-device batch a divisor of ft.batch_size, then the same with the
    optimizer in host memory (also on one GPU)."""
    out: list[tuple[str, int]] = [("single", 1)]
    if not machine.cuda:
        return out
    counts = [n for n in range(machine.gpus, 0, -1) if accumulation_for(ft, n) is not None]
    if counts and counts[0] > 1:
        out.append(("zero3", counts[0]))
    if counts:
        out.append(("zero3_offload", counts[0]))
    return out


def _ft_estimate(shape: Shape, ft: FtConfig, config: Config, model: str, machine: Machine, strategy: str,
                 n: int) -> tuple[Estimate, FTShape, bool]:
    dtype = compute_dtype(config, model, machine.cuda)
    half = dtype != "fp32"
    fts = ft_shape(ft, config, n)
    est = train_memory(shape, ft.method, tokens=fts.tokens_per_pass, logit_positions=fts.logit_positions,
                       lora_r=ft.lora.r, half=half, optimizer=ft.optimizer,
                       accumulation=accumulation_for(ft, n) or 1, checkpointing=ft.gradient_checkpointing,
                       strategy=strategy, n_gpus=n, cuda=machine.cuda, param_bytes=param_bytes(ft))
    return est, fts, half


def _ft_row(config: Config, runs: list[FTRun], shape: Shape | None, machine: Machine, results: Path,
            config_arg: Invocation, stage: str = "FT") -> PlanRow:
    first = runs[0]
    ft, model = first.config.ft, first.model
    tasks = sorted({t for r in runs for t in r.tasks}, key=list(config.data.tasks).index) \
        if all(t in config.data.tasks for r in runs for t in r.tasks) else sorted({t for r in runs for t in r.tasks})
    groups = sorted({"+".join(r.tasks) for r in runs}, key=lambda g: [tasks.index(t) for t in g.split("+")])
    seeds = sorted({r.train_seed for r in runs})
    label = (f"{first.protocol} ({ft.method}) N={first.n_train}: "
             f"{', '.join(groups) if len(groups) <= 2 else f'{len(groups)} tasks one at a time'}, "
             f"seeds {','.join(map(str, seeds))}")
    if shape is None:
        return PlanRow(stage, model, label, len(runs), "runs", "unknown", None, None, None, None,
                       note="model size unknown here: not estimated", runs=runs)
    best = None
    for strategy, n in _strategies(machine, ft):
        # the largest pass over the row's task groups
        ests = [_ft_estimate(shape, r.config.ft, config, model, machine, strategy, n) for r in runs]
        est, fts, half = max(ests, key=lambda e: e[0].device)
        if fits(est, machine):
            best = (strategy, n, est, half)
            break
    single_est, _, half = max((_ft_estimate(shape, r.config.ft, config, model, machine, "single", 1) for r in runs),
                              key=lambda e: e[0].device)
    seconds = 0.0
    strategy, n, est = (best[0], best[1], best[2]) if best else ("single", 1, single_est)
    for r in runs:
        fts = ft_shape(r.config.ft, config, n)
        seconds += train_seconds(shape, r.config.ft.method, fts, half=half, cuda=machine.cuda,
                                 strategy=strategy, processes=n,
                                 accumulation=accumulation_for(r.config.ft, n) or 1, lora_r=r.config.ft.lora.r)
        seconds += _ft_eval_seconds(config, r, shape, machine)
    row = PlanRow(stage, model, label, len(runs), "runs", strategy if machine.cuda else "cpu", _gib(est.device),
                  _gib(est.host) if est.host else None, seconds, best is not None, in_process=strategy == "single",
                  runs=runs, processes=n)
    if best is None:
        row.note = _ft_alternatives(shape, ft, config, model, machine, single_est)
    elif strategy != "single":
        row.launch = launch_command(config, first, strategy, n, results, config_arg)
        row.note = (f"reproduce.py runs one process: launch these first ({ACCELERATE_FILE[strategy]}, one "
                    f"command per seed); reproduce.py then reuses the folders")
    return row


def _ft_eval_seconds(config: Config, run: FTRun, shape: Shape, machine: Machine) -> float:
    cfg = run.config
    nbytes = 4 if compute_dtype(config, run.model, machine.cuda) == "fp32" else 2
    total = 0.0
    for task in run.tasks:
        _, _, answer, demo, query, _ = task_tokens(task)
        shots = list(config.reproduce.ft_eval_shots)
        cells = [(k, _items(cfg, task)) for k in shots]
        total += eval_seconds(shape, cells=cells, query=query, demo=demo,
                              new_tokens=config.eval.max_new_tokens or answer + 2,
                              batch=config.eval.batch_size, weight_bytes=nbytes, half=nbytes == 2,
                              cuda=machine.cuda)
    return total + load_seconds(shape, nbytes, machine.cuda)


def _ft_alternatives(shape: Shape, ft: FtConfig, config: Config, model: str, machine: Machine, single: Estimate) -> str:
    """One line: what the run needs on one device and what would fit (on this machine, else on which)."""
    where = "the GPU" if machine.cuda else "host RAM"
    have = (machine.gpu_bytes if machine.cuda else machine.host_bytes) / GIB
    options = []
    if ft.method != "lora":
        est, _, _ = _ft_estimate(shape, dataclasses.replace(ft, method="lora"), config, model, machine, "single", 1)
        if fits(est, machine):
            options.append(f"LoRA here (~{needed(est, machine.cuda) / GIB:.0f} GiB)")
    if ft.method == "full" and ft.optimizer not in STOCHASTIC_ROUNDING:
        # torchao's 8-bit AdamW: over the fp32 master weights, else also with bf16 weights
        for low, text in (({"optimizer": "adamw_torch_8bit"}, "ft.optimizer=adamw_torch_8bit"),
                          ({"optimizer": "adamw_torch_8bit", "param_dtype": "bf16"},
                           "ft.optimizer=adamw_torch_8bit ft.param_dtype=bf16")):
            est, _, _ = _ft_estimate(shape, dataclasses.replace(ft, **low), config, model, machine, "single", 1)
            if fits(est, machine):
                options.append(f"{text} here (~{needed(est, machine.cuda) / GIB:.0f} GiB)")
                break
    if not ft.gradient_checkpointing:
        est, _, _ = _ft_estimate(shape, dataclasses.replace(ft, gradient_checkpointing=True), config, model, machine, "single", 1)
        if fits(est, machine):
            options.append(f"ft.gradient_checkpointing=true here (~{needed(est, machine.cuda) / GIB:.0f} GiB)")
    gpu_gib = machine.gpu_bytes / GIB if machine.cuda else 80.0
    gpu = Machine(1, gpu_gib * GIB, machine.host_bytes, "")
    est, _, _ = _ft_estimate(shape, ft, config, model, gpu, "single", 1)
    if not machine.cuda and fits(est, gpu):
        options.append(f"one GPU with >= {needed(est, True) / FIT_FRACTION / GIB:.0f} GiB")
    if ft.method != "lora" or not fits(est, gpu):
        offload, _, _ = _ft_estimate(shape, ft, config, model, gpu, "zero3_offload", 1)
        options.append(f"ZeRO-3 with CPU offload on one {gpu_gib:.0f} GiB GPU (~{needed(offload, True) / GIB:.0f} GiB "
                       f"GPU + ~{(offload.host + CPU_OVERHEAD) / FIT_FRACTION / GIB:.0f} GiB host RAM: "
                       f"configs/accelerate/deepspeed_zero3_offload.yaml)")
        for n in range(2, 65):
            if accumulation_for(ft, n) is None:
                continue
            est, _, _ = _ft_estimate(shape, ft, config, model, Machine(n, gpu_gib * GIB, machine.host_bytes, ""),
                                     "zero3", n)
            if needed(est, True) <= FIT_FRACTION * gpu_gib * GIB:
                options.append(f"ZeRO-3 on {n} x {gpu_gib:.0f} GiB GPUs (~{needed(est, True) / GIB:.0f} GiB each: "
                               f"configs/accelerate/deepspeed_zero3.yaml --num_processes {n})")
                break
    return (f"needs ~{needed(single, machine.cuda) / GIB:.0f} GiB on one device, {where} has {have:.0f} GiB; "
            f"would fit: " + "; or ".join(options))


def _value(v: Any) -> str:
    """``v`` as YAML that parses back to the same value (a float keeps a dot: YAML reads 1e-05 as a string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        mantissa, _, exponent = text.partition("e")
        return text if "." in mantissa or not exponent else f"{mantissa}.0e{exponent}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


@dataclass(frozen=True)
class Invocation:
    """How reproduce.py was started, so a launch command trains into its folders with its settings."""

    config_arg: str | None = None  # --config as typed (None: no --config)
    data: Path | None = None  # --data (default data/<config name>)
    overrides: tuple[str, ...] = ()  # KEY=VALUE overrides on its command line


def launch_command(config: Config, run: FTRun, strategy: str, n: int, results: Path,
                   how: Invocation | None = None) -> str:
    """The ``accelerate launch`` command that trains ``run`` into the folder reproduce.py reads (the
    run's ft section as overrides of the config's)."""
    how = how or Invocation(f"configs/{config.name}.yaml" if config.name else None)
    overrides = [f"'{o}'" if any(c in o for c in "[]{} ,") else o for o in how.overrides]
    base = config.ft.to_dict()
    for key, value in run.config.ft.to_dict().items():
        if base.get(key) != value:
            text = f"ft.{key}={_value(value)}"
            overrides.append(f"'{text}'" if any(c in text for c in "[]{} ,") else text)
    procs = f" --num_processes {n}" if n != 1 or strategy == "zero3" else ""
    out = results / "ft" / run.rel
    data = how.data or Path("data") / (config.name or "default")
    config_flag = f"--config {how.config_arg} " if how.config_arg else ""
    return (f"accelerate launch --config_file configs/accelerate/{ACCELERATE_FILE[strategy]}{procs} finetune.py "
            f"{config_flag}--model {run.model} --data {data} --out {out} {' '.join(overrides)}").rstrip()


def plan_study(config: Config, machine: Machine | None = None, results: Path | None = None,
               invocation: Invocation | None = None) -> Plan:
    """Every ICL cell, FT run (with its evaluation), ladder rung and circuit analysis ``config`` implies,
    grouped into rows (ICL: model x task; FT: model x protocol x N, its tasks and seeds), each with
    its estimated peak memory, time and whether it fits ``machine`` (default: this one)."""
    machine = machine or detect_machine()
    name = config.name or "default"
    results = Path(results) if results is not None else Path("results") / name
    config_arg = invocation or Invocation(f"configs/{name}.yaml" if config.name else None)
    rows: list[PlanRow] = []
    totals = {"icl_cells": 0, "ft_runs": 0, "models": 0}
    shapes: dict[str, Shape | None] = {}

    def shape_of(model: str) -> Shape | None:
        if model not in shapes:
            shapes[model] = model_shape(model)
        return shapes[model]

    ft_runs = plan_ft(config)
    models = config.models if (config.reproduce.icl or ft_runs) else []
    totals["models"] = len(models)
    for model in models:
        if config.reproduce.icl:
            for task in config.eval_tasks:
                row = _eval_row(config, model, shape_of(model), task, list(config.eval.shots),
                                list(config.eval.demo_seeds), machine)
                totals["icl_cells"] += row.number
                rows.append(row)
        groups: dict[tuple, list] = {}
        for run in (r for r in ft_runs if r.model == model):
            groups.setdefault((run.protocol, run.n_train), []).append(run)
        for runs in groups.values():
            rows.append(_ft_row(config, runs, shape_of(model), machine, results, config_arg))
            totals["ft_runs"] += len(runs)
    if config.ladder.rungs:
        rows.extend(_ladder_rows(config, machine, results, shape_of, config_arg))
    if config.circuits.enabled:
        for model in config.models:
            rows.append(_circuits_row(config, model, shape_of(model), machine))
    return Plan(name, machine, rows, totals)


def _ladder_rows(config: Config, machine: Machine, results: Path, shape_of, config_arg: Invocation) -> list[PlanRow]:
    rows = []
    seen: set[str] = set()
    for rung in plan_ladder(config, results):
        cfg, model = rung.config, rung.config.model
        if str(rung.icl_dir) not in seen:
            seen.add(str(rung.icl_dir))
            for task in cfg.eval.tasks:
                rows.append(_eval_row(cfg, model, shape_of(model), task, list(cfg.eval.shots),
                                      list(cfg.eval.demo_seeds), machine, stage=f"ladder {rung.index} ICL"))
        for ft in rung.ft:
            if str(ft.ft_dir) in seen:
                continue
            seen.add(str(ft.ft_dir))
            run = FTRun(model, f"rung{rung.index}", tuple(ft.tasks), ft.config.ft.n_train, ft.seed, ft.config)
            rows.append(_ft_row(cfg, [run], shape_of(model), machine, results, config_arg,
                                stage=f"ladder {rung.index} FT"))
    return rows


def _circuits_row(config: Config, model: str, shape: Shape | None, machine: Machine) -> PlanRow:
    circ = config.circuits
    label = (f"circuit shift: {', '.join(circ.tasks)}; {circ.n_items} pairs, {circ.shots} shots, "
             f"{circ.method}, {circ.dtype}")
    how = "single" if machine.cuda else "cpu"
    if shape is None:
        return PlanRow("circuits", model, label, len(circ.tasks), "tasks", how, None, None, None, None,
                       note="model size unknown here: not estimated")
    nbytes = 4 if str(circ.dtype).lower() in ("fp32", "float32", "float") else 2
    demo = max(task_tokens(t)[3] for t in circ.tasks)
    query = max(task_tokens(t)[5] for t in circ.tasks)
    tokens = 2 * (HEADER_TOKENS + circ.shots * demo + query)  # clean + corrupted, one backward pass
    acts = shape.activation_bytes(tokens, lora=False, half=nbytes == 2)
    logits = 2 * shape.vocab * 4
    est = Estimate(shape.params * nbytes + acts + logits, 0.0, {"weights": shape.params * nbytes, "activations": acts})
    if circ.method != "attribution" or circ.activation_items:
        est.device += eval_memory(shape, weight_bytes=nbytes, batch=circ.batch_size, context=tokens / 2,
                                  query=query).parts["kv_cache"]
    # per pair and condition (base, ICL, FT): one forward + backward (~3 forwards) over the clean and the
    # corrupted item after the cached prefix; the prefix once per task and condition
    rate = _rates(machine.cuda)
    flops = rate.prefill_flops / (1.0 if nbytes == 2 else rate.fp32_slowdown)
    mean_query = sum(task_tokens(t)[4] for t in circ.tasks) / len(circ.tasks)
    attribution = 3 * 2 * mean_query * 2 * shape.matmul_params / flops
    exact = shape.layers * (shape.heads + 1) * mean_query * 2 * shape.matmul_params / flops  # a pass per component
    exact_pairs = circ.n_items if circ.method != "attribution" else min(circ.activation_items, circ.n_items)
    attribution_pairs = circ.n_items if circ.method != "activation" else 0
    prefix = (HEADER_TOKENS + circ.shots * demo) * 2 * shape.matmul_params / flops
    secs = 3 * len(circ.tasks) * (attribution_pairs * attribution + exact_pairs * exact + prefix) \
        + load_seconds(shape, nbytes, machine.cuda)
    ok = fits(est, machine)
    return PlanRow("circuits", model, label, len(circ.tasks), "tasks", how, _gib(est.device), None, secs, ok,
                   note="" if ok else _eval_alternatives(est, machine, config))


# ----------------------------------------------------------------------------------------------------
# output and the check before a run
# ----------------------------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_plan(plan: Plan) -> str:
    """The plan as markdown: the machine, one table row per group of cells or runs, the launch
    commands of runs reproduce.py cannot run in-process, and one line per run that does not fit."""
    m = plan.machine
    rates = GPU_RATES if m.cuda else CPU_RATES
    lines = [f"# Plan: config `{plan.config_name}`", "",
             f"Machine: {m.label}.",
             f"{plan.totals['models']} model(s), {plan.totals['icl_cells']} ICL cells, {plan.totals['ft_runs']} "
             f"fine-tuning runs (each evaluated after training).",
             f"Peak memory: estimated per device (iclvsft/plan/estimates.py); a run fits when the estimate + "
             f"{(CUDA_OVERHEAD if m.cuda else CPU_OVERHEAD) / GIB:.0f} GiB of process overhead is at most "
             f"{FIT_FRACTION:.0%} of the memory. Time: estimated from {rates.label}; FT rows include the "
             f"evaluation of each fine-tuned model.", "",
             "| # | stage | model | what | runs | how | peak GiB | host GiB | time | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(plan.rows, 1):
        fit = "?" if r.fits is None else ("yes" if r.fits else "**no**")
        lines.append(f"| {n} | {r.stage} | {_short(r.model)} | {r.what} | {r.count} | {r.how} | "
                     f"{'?' if r.device_gib is None else f'{r.device_gib:.1f}'} | "
                     f"{'–' if r.host_gib is None else f'{r.host_gib:.0f}'} | {_duration(r.seconds)} | {fit} |")
    in_process = sum(r.seconds or 0.0 for r in plan.rows if r.in_process)
    launched = sum(r.seconds or 0.0 for r in plan.rows if not r.in_process)
    lines += ["", f"Estimated time: {_duration(in_process)} for what reproduce.py runs in sequence"
              + (f", plus {_duration(launched)} of launched runs" if launched else "") + "."]
    launches = [r for r in plan.rows if r.launch]
    if launches:
        lines += ["", "Runs that need a launcher (reproduce.py reuses their folders once finished; one command per "
                  "seed and task group, the first shown):", ""]
        lines += [f"* row {plan.rows.index(r) + 1}: `{r.launch}`" for r in launches]
    unknown = [r for r in plan.rows if r.fits is None]
    if unknown:
        lines += ["", f"Not estimated (model size unknown without its config.json): "
                  f"{', '.join(sorted({_short(r.model) for r in unknown}))}."]
    if plan.problems:
        lines += ["", "Runs that do not fit this machine:", ""]
        lines += [f"* row {plan.rows.index(r) + 1} ({r.stage}, {_short(r.model)}, {r.what}): {r.note}"
                  for r in plan.problems]
    else:
        lines += ["", "Every run fits this machine." if not unknown else "Every estimated run fits this machine."]
    return "\n".join(lines) + "\n"


def _finished(results: Path, run: FTRun) -> bool:
    return (results / "ft" / run.rel / "summary.json").is_file()


def check_plan(config: Config, machine: Machine | None = None, results: Path | None = None,
               invocation: Invocation | None = None) -> Plan:
    """Refuse, before any work, a study with a run that cannot run here: one that does not fit this
    machine, or one that needs a launcher (ZeRO-3) and whose folder under ``results`` is not finished.
    Raises :class:`ConfigError` with one line naming the first such run and what would fit; returns
    the plan otherwise. Runs of unknown size are not refused."""
    plan = plan_study(config, machine, results, invocation)
    results = Path(results) if results is not None else Path("results") / plan.config_name
    for row in plan.rows:
        if row.fits is False:
            more = sum(1 for r in plan.rows if r.fits is False) - 1
            raise ConfigError(f"{row.stage} {_short(row.model)} {row.what}: {row.note}"
                              + (f" ({more} more: reproduce.py --plan lists them)" if more else ""))
        if row.fits and not row.in_process:
            todo = [r for r in row.runs if not _finished(results, r)] if row.stage == "FT" else row.runs
            if todo:
                command = launch_command(config, todo[0], row.strategy, row.processes, results, invocation)
                raise ConfigError(f"{row.stage} {_short(row.model)} {row.what} needs {row.how} on this machine "
                                  f"(~{row.device_gib:.0f} GiB per GPU), more than reproduce.py's one process: run "
                                  f"`{command}` for each of its {len(todo)} unfinished runs first (reproduce.py --plan "
                                  f"lists them), then rerun")
    return plan
