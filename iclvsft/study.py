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

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .circuits import analyze, check_circuit_settings, report_section
from .config import Config, derive
from .data import generate, is_up_to_date
from .errors import ConfigError
from .evaluate import EvalPlan
from .evaluate.cells import cell_keys
from .fit import Runners, fit_and_evaluate
from .io import provenance, read_json, slug, write_json
from .jobs import FTRun, plan_ft, with_eval
from .ladder import run_ladder
from .models import release_memory
from .plan import Invocation, check_plan
from .report import Comparison, FTResult, WrittenReport, build_summary, write_report
from .writers import writing

PARTIAL = ("## Partial report\n\nThe study is still running: {done} of {total} models done (left: {left}){more}. This "
           "file is rewritten after each model and once more at the end.\n")


@dataclass
class Study:
    """One run of the study: its config, folders and runners, and what the stages have produced so far."""

    config: Config
    data_dir: Path
    results: Path
    runners: Runners
    ft_runs: list[FTRun] = field(default_factory=list)
    circuit_configs: dict[str, Config] = field(default_factory=dict)
    summaries: list[dict] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # report sections after the models' (circuits, ladder)
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Wall seconds of the block, into timings.json under ``key``."""
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0

    def check(self) -> None:
        """Before any work: the plan fits this machine, and finished circuit folders match these settings."""
        config = self.config
        check_plan(config, results=self.results, invocation=Invocation(
            f"configs/{config.name}.yaml" if config.name else None, self.data_dir))
        self.ft_runs = plan_ft(config)
        if config.circuits.enabled:
            self.circuit_configs = {m: _circuit_config(config, self.results, self.ft_runs, m) for m in config.models}
        for model, cfg in self.circuit_configs.items():  # a refused run leaves the report as it was
            out = self.results / "circuits" / slug(model)
            if (out / "circuits.json").is_file():
                check_circuit_settings(out, cfg, not config.circuits.adapter)
        self.results.mkdir(parents=True, exist_ok=True)
        write_json(self.results / "config.json", {"config": config.to_dict(), "provenance": provenance()})

    def data(self) -> None:
        with self.timed("data"):
            if not is_up_to_date(self.config, self.data_dir):
                if (self.data_dir / "manifest.json").exists():
                    raise ConfigError(f"{self.data_dir} holds data made with other settings", "another_data")
                generate(self.config, self.data_dir, show_progress=self.runners.show_progress)

    def models(self) -> None:
        """Per model: the ICL sweep, each FT run and its evaluation, then a partial report."""
        config, results, runners = self.config, self.results, self.runners
        models = config.models if config.reproduce.icl or self.ft_runs else []  # a ladder preset may have neither
        for n, model in enumerate(models):
            if config.reproduce.icl:
                with self.timed(f"icl/{slug(model)}"):
                    cfg = with_eval(config, model, config.eval_tasks, config.eval.shots)
                    runners.evaluate(EvalPlan(cfg, self.data_dir, results / "icl" / slug(model), model, None),
                                     show_progress=runners.show_progress)
                    release_memory()
            for run in (r for r in self.ft_runs if r.model == model):
                with self.timed(f"ft/{run.rel}"):
                    fit_and_evaluate(run.eval_config, results / "ft" / run.rel, results / "ft_eval" / run.rel,
                                     self.data_dir, runners)
            self.summaries.append(_model_summary(config, results, self.ft_runs, model))
            left = len(models) - n - 1
            if left or config.circuits.enabled or config.ladder.rungs:
                write_report(results, self.summaries, [PARTIAL.format(
                    done=n + 1, total=len(models), left=", ".join(models[n + 1:]) or "none",
                    more=" and the analyses after them" if not left else "")])

    def circuits(self) -> None:
        for model, cfg in self.circuit_configs.items():
            with self.timed(f"circuits/{slug(model)}"):
                out = self.results / "circuits" / slug(model)
                if (out / "circuits.json").is_file():  # its settings were checked before any work
                    result = json.loads((out / "circuits.json").read_text())
                else:
                    result = analyze(cfg, self.data_dir, out, show_progress=self.runners.show_progress)
                self.sections.append(report_section(result, link_prefix=f"circuits/{slug(model)}/",
                                                    base_invalid=_zero_shot_invalid(self.summaries, model)))

    def ladder(self) -> None:
        config = self.config
        if not config.ladder.rungs:
            return
        with self.timed("ladder"):
            section, _ = run_ladder(config, self.data_dir, self.results, self.runners)
            self.sections.insert(0, section)
            if not (config.reproduce.icl or self.ft_runs):  # a ladder-only preset: the report's title
                self.sections.insert(0, f"# ICL vs FT, from the authors' setup to ours: {config.model} "
                                        f"(config `{config.name or 'default'}`)\n")


def run_study(config: Config, data_dir: Path, results: Path, show_progress: bool = True,
              runners: Runners | None = None) -> WrittenReport:
    """Run (or resume) every stage, holding ``results``' writer lock (each stage also locks the folder it
    writes); returns report.md as written (path, headline). ``runners``: what trains and evaluates
    (tests pass wrappers of the real ones)."""
    runners = dataclasses.replace(runners or Runners(), show_progress=show_progress)
    study = Study(config, data_dir, results, runners)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with writing(results):
        with study.timed("total"):
            for stage in (study.check, study.data, study.models, study.circuits, study.ladder):
                stage()
            report = write_report(results, study.summaries, study.sections)
        _append_timings(results / "timings.json", started_at, study.timings)
    return report


def _model_summary(config: Config, results: Path, ft_runs: list[FTRun], model: str) -> dict:
    """The report's numbers for one model, from its ICL folder and its FT evaluation folders."""
    rep, tasks = config.reproduce, config.eval_tasks
    ft_results = [FTResult(r.protocol, r.config.ft.method, r.tasks, r.n_train, r.train_seed,
                           results / "ft_eval" / r.rel / "metrics.json",
                           read_json(results / "ft" / r.rel / "summary.json"),
                           cell_keys(r.tasks, rep.ft_eval_shots, config.eval.demo_seeds))
                  for r in ft_runs if r.model == model]
    compare = Comparison(rep.compare_shots, rep.compare_n_train, rep.compare_protocol, rep.max_invalid)
    return build_summary(tasks, results / "icl" / slug(model) / "metrics.json", ft_results, model,
                         config.name or "default", compare, cell_keys(tasks, config.eval.shots, config.eval.demo_seeds),
                         smoke=rep.smoke, prompt_style=config.prompt_style, prompt_format=config.prompt_format)


def _append_timings(path: Path, started_at: str, seconds: dict[str, float]) -> None:
    """Add this run's stage times to timings.json, which keeps every run (oldest first), so that a
    rerun that reuses everything does not erase the wall times of the run that did the work."""
    runs = read_json(path).get("runs", [])
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


def _circuit_config(config: Config, results: Path, ft_runs: list[FTRun], model: str) -> Config:
    """The config the circuit analysis of ``model`` runs with: its FT condition, when not named, the study's run."""
    adapter = config.circuits.adapter or _circuit_adapter(results, ft_runs, model)
    return derive(config, {"model": model, "circuits.adapter": adapter})


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
