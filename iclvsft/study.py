"""The whole study for one config, resumable at cell granularity (reproduce.py).

Stages, each skipped where its output is already complete:

1. data: ``generate_data`` into ``--data`` (default ``data/<config name>``) unless it already holds
   exactly this config's data;
2. ICL: for each model, the eval section's sweep (shots x demo seeds) on the base model, one
   test.py folder per model (cells already in samples.jsonl are not recomputed);
3. FT: for each model, protocol, task (or mixed task set), N and train seed, one finetune.py folder;
   a folder with summary.json is finished and skipped, one without resumes from its last checkpoint;
4. FT evaluation: each fine-tuned model zero-shot on its task(s), one test.py folder each;
5. circuit shift (``iclvsft.circuits``) when ``circuits.enabled``: attribution maps under base,
   ICL and FT (the first protocol's largest single-task run unless ``circuits.adapter`` is set);
6. the report (``iclvsft.report``): report.md, summary.json, plots.

Layout under ``results/<config name>/``::

    config.json                                    the resolved config and provenance
    icl/<model>/                                   test.py output for the base model
    ft/<model>/<protocol>/<tasks>/n<N>-s<seed>/    finetune.py output (adapter or full model)
    ft_eval/<model>/<protocol>/<tasks>/n<N>-s<seed>/  test.py output for that fine-tuned model
    circuits/<model>/                              analyze_circuits.py output (when enabled)
    report.md  summary.json  plots/  timings.json

report.md holds no timings or other run-to-run noise, so an interrupted and resumed run ends with
the same report as an uninterrupted one; wall times go to timings.json, one entry per run.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .cards import write_model_card
from .config import protocol_ft
from .data import generate, is_up_to_date
from .errors import ConfigError
from .evaluate import EvalPlan, evaluate
from .evaluate.cells import cell_keys
from .io import provenance, slug, write_json
from .models import release_memory
from .report import Comparison, FTResult, build_summary, write_report
from .runs import differences, summarise_differences
from .train import finetune, is_finished

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTRun:
    model: str
    protocol: str
    tasks: tuple[str, ...]  # trained together (one task, or the mixed set)
    n_train: int
    train_seed: int
    config: dict  # the full config with this run's ft section

    @property
    def rel(self) -> Path:
        return Path(slug(self.model)) / self.protocol / "+".join(self.tasks) / f"n{self.n_train}-s{self.train_seed}"


def models_of(config: dict) -> list[str]:
    return list(config["reproduce"]["models"]) or [config["model"]]


def plan_ft(config: dict) -> list[FTRun]:
    rep = config["reproduce"]
    default_tasks = rep["ft_tasks"] or config["data"]["tasks"]
    runs = []
    for model in models_of(config):
        for protocol in rep["ft_protocols"]:
            ft = protocol_ft(config, protocol)
            tasks = rep["ft_protocol_tasks"].get(protocol) or default_tasks
            unknown = [t for t in tasks if t not in config["data"]["tasks"]]
            if unknown:
                raise ConfigError(f"reproduce: protocol {protocol!r} uses tasks {unknown} that data.tasks does not generate")
            groups = [tuple(ft["tasks"])] if ft["tasks"] else [(t,) for t in tasks]
            ns = rep["ft_protocol_n_train"].get(protocol) or rep["ft_n_train"]
            compared = protocol == (rep["compare_protocol"] or next(iter(rep["ft_protocols"])))
            compared_n = rep["compare_n_train"] or max(ns)
            for group in groups:
                for n in ns:
                    seeds = rep["compare_train_seeds"] if compared and n == compared_n and rep["compare_train_seeds"] \
                        else rep["ft_train_seeds"]
                    for seed in seeds:
                        cfg = copy.deepcopy(config)
                        cfg["model"] = model
                        cfg["ft"] = {**ft, "tasks": list(group), "n_train": n, "train_seed": seed}
                        runs.append(FTRun(model, protocol, group, n, seed, cfg))
    return runs


def _eval_config(config: dict, model: str, tasks: list[str], shots: list[int]) -> dict:
    cfg = copy.deepcopy(config)
    cfg["model"] = model
    cfg["eval"] = {**cfg["eval"], "tasks": list(tasks), "shots": list(shots)}
    return cfg


def run_study(config: dict, data_dir: Path, results: Path, show_progress: bool = True,
              finetune_fn=None, evaluate_fn=None) -> Path:
    """Run (or resume) every stage; returns the path of report.md.

    ``finetune_fn`` / ``evaluate_fn`` default to :func:`iclvsft.train.finetune` and
    :func:`iclvsft.evaluate.evaluate` (tests pass wrappers that interrupt them).
    """
    finetune_fn = finetune_fn or finetune
    evaluate_fn = evaluate_fn or evaluate
    timings: dict[str, float] = {}
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    from .plan import Invocation, check_plan  # a run that cannot fit here: one line, exit 2, before any work

    check_plan(config, results=results, invocation=Invocation(
        f"configs/{config['name']}.yaml" if config["name"] else None, data_dir))
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "config.json", {"config": config, "provenance": provenance()})

    t0 = time.perf_counter()
    if not is_up_to_date(config, data_dir):
        if (data_dir / "manifest.json").exists():
            raise ConfigError(f"{data_dir} holds data made with other settings; pass another --data folder")
        generate(config, data_dir, show_progress=show_progress)
    timings["data"] = time.perf_counter() - t0

    tasks = list(config["eval"]["tasks"] or config["data"]["tasks"])
    ft_runs = plan_ft(config)
    circuit_configs = ({model: _circuit_config(config, results, ft_runs, model) for model in models_of(config)}
                       if config["circuits"]["enabled"] else {})
    for model, cfg in circuit_configs.items():  # before any work: a refused run leaves the report as it was
        if (results / "circuits" / slug(model) / "circuits.json").is_file():
            _check_circuit_settings(results / "circuits" / slug(model), cfg, not config["circuits"]["adapter"])
    main_study = config["reproduce"]["icl"] or bool(ft_runs)  # a ladder preset may have neither
    summaries: list[dict] = []
    models = models_of(config) if main_study else []
    for n, model in enumerate(models):  # one model at a time: a partial report after each
        if config["reproduce"]["icl"]:
            t0 = time.perf_counter()
            cfg = _eval_config(config, model, tasks, config["eval"]["shots"])
            evaluate_fn(EvalPlan(cfg, data_dir, results / "icl" / slug(model), model, None), show_progress=show_progress)
            release_memory()
            timings[f"icl/{slug(model)}"] = time.perf_counter() - t0
        for run in (r for r in ft_runs if r.model == model):
            t0 = time.perf_counter()
            cfg = _eval_config(run.config, run.model, list(run.tasks), config["reproduce"]["ft_eval_shots"])
            fit_and_evaluate(cfg, results / "ft" / run.rel, results / "ft_eval" / run.rel, data_dir, show_progress,
                             finetune_fn, evaluate_fn)
            timings[f"ft/{run.rel}"] = time.perf_counter() - t0
        summaries.append(_model_summary(config, results, tasks, ft_runs, model))
        left = len(models) - n - 1
        if left or config["circuits"]["enabled"] or config["ladder"]["rungs"]:
            write_report(results, summaries, [PARTIAL.format(done=n + 1, total=len(models), left=", ".join(
                models[n + 1:]) or "none", more=" and the analyses after them" if not left else "")])

    extra: list[str] = []
    if config["circuits"]["enabled"]:
        from .circuits import analyze, report_section

        for model in models_of(config):
            t0 = time.perf_counter()
            out = results / "circuits" / slug(model)
            if (out / "circuits.json").is_file():  # its settings were checked before any work
                result = json.loads((out / "circuits.json").read_text())
            else:
                result = analyze(circuit_configs[model], data_dir, out, show_progress=show_progress)
            extra.append(report_section(result, link_prefix=f"circuits/{slug(model)}/",
                                        base_invalid=_zero_shot_invalid(summaries, model)))
            timings[f"circuits/{slug(model)}"] = time.perf_counter() - t0

    if config["ladder"]["rungs"]:
        from .ladder import run_ladder

        t0 = time.perf_counter()
        section, _ = run_ladder(config, data_dir, results, show_progress, finetune_fn, evaluate_fn)
        extra.insert(0, section)
        if not (config["reproduce"]["icl"] or ft_runs):  # a ladder-only preset: the report's title
            extra.insert(0, f"# ICL vs FT, from the authors' setup to ours: {config['model']} "
                            f"(config `{config['name'] or 'default'}`)\n")
        timings["ladder"] = time.perf_counter() - t0

    report = write_report(results, summaries, extra)
    timings["total"] = time.perf_counter() - started
    _append_timings(results / "timings.json", started_at, timings)
    return report


PARTIAL = ("## Partial report\n\nThe study is still running: {done} of {total} models done (left: {left}){more}. This "
           "file is rewritten after each model and once more at the end.\n")


def _model_summary(config: dict, results: Path, tasks: list[str], ft_runs: list[FTRun], model: str) -> dict:
    """The report's numbers for one model, from its ICL folder and its FT evaluation folders."""
    rep = config["reproduce"]
    ft_results = [FTResult(r.protocol, r.config["ft"]["method"], r.tasks, r.n_train, r.train_seed,
                           results / "ft_eval" / r.rel / "metrics.json",
                           _read_json(results / "ft" / r.rel / "summary.json"),
                           cell_keys(r.tasks, rep["ft_eval_shots"], config["eval"]["demo_seeds"]))
                  for r in ft_runs if r.model == model]
    compare = Comparison(rep["compare_shots"], rep["compare_n_train"], rep["compare_protocol"], rep["max_invalid"])
    return build_summary(tasks, results / "icl" / slug(model) / "metrics.json", ft_results, model,
                         config["name"] or "default", compare,
                         cell_keys(tasks, config["eval"]["shots"], config["eval"]["demo_seeds"]),
                         smoke=rep["smoke"], prompt_style=config["prompt_style"], prompt_format=config["format"])


def fit_and_evaluate(config: dict, ft_out: Path, eval_out: Path, data_dir: Path, show_progress: bool = True,
                     finetune_fn=None, evaluate_fn=None) -> None:
    """Fine-tune ``config`` into ``ft_out`` unless it holds that finished run, then evaluate the result
    into ``eval_out`` with ``config``'s eval section (both resume where they stopped)."""
    finetune_fn, evaluate_fn = finetune_fn or finetune, evaluate_fn or evaluate
    if not is_finished(config, ft_out, data_dir):
        log.info("fine-tuning %s", ft_out)
        finetune_fn(config, ft_out, data_dir, show_progress=show_progress)
        release_memory()  # the trained model's memory, before the evaluation loads it again
    adapter = ft_out if (ft_out / "adapter_config.json").is_file() else None
    model_name = config["model"] if adapter else str(ft_out)
    cfg = {**config, "model": model_name}
    metrics = evaluate_fn(EvalPlan(cfg, data_dir, eval_out, model_name, str(adapter) if adapter else None),
                          show_progress=show_progress)
    release_memory()
    summary = _read_json(ft_out / "summary.json")
    if isinstance(metrics, dict) and summary:  # the model card gains the zero-shot results
        results: dict[str, dict[str, str]] = {}
        for e in metrics.get("by_condition", []):
            if e["k"] == 0 and e.get("accuracy"):
                results.setdefault(e["task"], {})[e["split"]] = f"{100 * e['accuracy']['mean']:.1f}"
        write_model_card(ft_out, config, summary, results)


def _append_timings(path: Path, started_at: str, seconds: dict[str, float]) -> None:
    """Add this run's stage times to timings.json, which keeps every run (oldest first), so that a
    rerun that reuses everything does not erase the wall times of the run that did the work."""
    runs = _read_json(path).get("runs", [])
    runs.append({"started_at": started_at, "seconds": seconds, "provenance": provenance()})
    write_json(path, {"runs": runs})


def _circuit_adapter(results: Path, ft_runs: list[FTRun], model: str) -> str:
    """The FT condition of the circuit analysis: the first protocol's single-task run with the
    most rows (first train seed), as a path template with ``{task}``; "" when there is none."""
    single = [r for r in ft_runs if r.model == model and len(r.tasks) == 1]
    if not single:
        return ""
    first = single[0].protocol
    best = max((r for r in single if r.protocol == first), key=lambda r: (r.n_train, -r.train_seed))
    return str(results / "ft" / slug(model) / first / "{task}" / f"n{best.n_train}-s{best.train_seed}")


def _circuit_config(config: dict, results: Path, ft_runs: list[FTRun], model: str) -> dict:
    """The config the circuit analysis of ``model`` runs with: its FT condition, when not named, the study's run."""
    cfg = copy.deepcopy(config)
    cfg["model"] = model
    if not cfg["circuits"]["adapter"]:
        cfg["circuits"]["adapter"] = _circuit_adapter(results, ft_runs, model)
    return cfg


def _circuit_settings(config: dict, derived_adapter: bool) -> dict[str, Any]:
    """What decides a circuits folder's results: the model and its precision, the data seed, the circuits
    section (its FT folder only when the user named one: a derived one is a study run, checked as such)."""
    circuits = {k: v for k, v in config["circuits"].items() if not (k == "adapter" and derived_adapter)}
    return {"model": config["model"], "dtype": config["dtype"], "attn_implementation": config["attn_implementation"],
            "data_seed": config["data"]["seed"], "demo_split": config["eval"]["demo_split"], "circuits": circuits}


def _check_circuit_settings(out: Path, config: dict, derived_adapter: bool) -> None:
    """Reuse a finished circuits folder only when it was made with these settings (one line otherwise)."""
    saved = _read_json(out / "config.json").get("config")
    diff = differences(_circuit_settings(saved, derived_adapter) if saved else None,
                       _circuit_settings(config, derived_adapter))
    if diff:
        raise ConfigError(f"{out} holds circuit results made with other settings ({summarise_differences(diff)}); "
                          "move that folder away to recompute it, or pass another --results folder")


def _zero_shot_invalid(summaries: list[dict], model: str) -> dict[str, float]:
    """Per task, the base model's zero-shot (k = 0) invalid share on pattern items, from the study's summary."""
    out = {}
    for s in summaries:
        if s["model"] == model:
            for task, t in s["tasks"].items():
                zero = next((r for r in t["icl"] if r["k"] == 0), None)
                share = (((zero or {}).get("pattern") or {}).get("invalid") or {}).get("mean")
                if share is not None:
                    out[task] = share
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
