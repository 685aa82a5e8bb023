"""The ladder from the authors' setup to ours (reproduce.py with a ``ladder`` section; docs/ladder.md).

Rung 0 applies the first rung's settings to the config (the authors' setup); every next rung changes
one more factor, cumulatively, ending at our protocol. Each rung is a whole config: its ICL sweep on
the base model, its fine-tuned model(s) and their zero-shot evaluation. Folders are shared by content:
a rung whose ICL (or FT) settings equal an earlier rung's reuses that rung's folder, so a rung that
changes only how results are read (scoring, which ICL cell) costs nothing, and a resumed ladder
recomputes nothing that is complete (each folder resumes like the main study's).

A rung whose data section differs from the config's (rung 0: the authors' distribution) reads its own
data folder beside ``--data``, ``<data>-<distribution>``, generated when missing.

Layout under ``results/<config name>/ladder/``::

    rung<i>/icl/                 test.py output: the base model under rung i's evaluation settings
    rung<i>/ft/<tasks>/          finetune.py output: rung i's model (one mixed, or one per task)
    rung<i>/ft_eval/<tasks>/     test.py output: that model zero-shot
    ladder.json                  the plan (which folder each rung reads) and every rung's numbers
"""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .data import generate, is_up_to_date
from .errors import ConfigError
from .evaluate import EvalPlan
from .fit import Runners, fit_and_evaluate
from .io import write_json
from .jobs import plan_ladder
from .report.ladder import ladder_section, ladder_summary


def run_ladder(config: Config, data_dir: Path, results: Path, runners: Runners | None = None) -> tuple[str, dict]:
    """Run (or resume) every rung; returns the report section and the ladder's numbers (also written
    to ``ladder/ladder.json`` with the section's plot in ``plots/ladder.png``)."""
    runners = runners or Runners()
    rungs = plan_ladder(config, results)
    for rung in rungs:
        data = rung.data_dir(data_dir)
        if rung.data_name and not is_up_to_date(rung.config, data):  # a rung with its own data (their distribution)
            if (data / "manifest.json").exists():
                raise ConfigError(f"{data} holds data made with other settings", "another_data")
            generate(rung.config, data, show_progress=runners.show_progress)
        runners.evaluate(EvalPlan(rung.config, data, rung.icl_dir, rung.config.model, None),
                         show_progress=runners.show_progress)
        for ft in rung.ft:
            fit_and_evaluate(ft.config, ft.ft_dir, ft.eval_dir, data, runners)
    summary = ladder_summary(rungs, config)
    write_json(results / "ladder" / "ladder.json", summary)
    return ladder_section(summary, results / "plots", link_prefix="plots/"), summary
