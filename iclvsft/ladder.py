"""The ladder from the authors' setup to ours (reproduce.py with a ``ladder`` section; README "Ladder").

Rung 0 applies the first rung's settings to the config (the authors' setup); every next rung changes
one more factor, cumulatively, ending at our protocol. Each rung is a whole config: its ICL sweep on
the base model, its fine-tuned model(s) and their zero-shot evaluation. Folders are shared by content:
a rung whose ICL (or FT) settings equal an earlier rung's reuses that rung's folder, so a rung that
changes only how results are read (scoring, which ICL cell) costs nothing, and a resumed ladder
recomputes nothing that is complete (each folder resumes like the main study's).

Layout under ``results/<config name>/ladder/``::

    rung<i>/icl/                 test.py output: the base model under rung i's evaluation settings
    rung<i>/ft/<tasks>/          finetune.py output: rung i's model (one mixed, or one per task)
    rung<i>/ft_eval/<tasks>/     test.py output: that model zero-shot
    ladder.json                  the plan (which folder each rung reads) and every rung's numbers
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import merge, nest, validate
from .errors import ConfigError


@dataclass
class Rung:
    index: int
    name: str
    why: str
    changes: dict  # the dotted keys this rung sets (rung 0: the authors' setup)
    config: dict  # the resolved config of this rung (ladder.rungs emptied)
    icl_dir: Path
    ft: list[tuple[tuple[str, ...], dict, Path, Path]] = field(default_factory=list)  # tasks, config, ft, eval

    @property
    def tasks(self) -> list[str]:
        return list(self.config["ladder"]["tasks"])


def rung_configs(config: dict) -> list[tuple[dict, dict]]:
    """(rung entry, resolved config) per rung, each rung's ``set`` applied over the previous rung's
    config; every one validated like a config file, so a bad key fails before any work."""
    out, current = [], copy.deepcopy(config)
    current["ladder"] = {**current["ladder"], "rungs": []}
    for n, rung in enumerate(config["ladder"]["rungs"]):
        for key, value in (rung.get("set") or {}).items():
            current = merge(current, nest(str(key), value), f"ladder.rungs[{n}] ({rung['name']})")
        validate(current)
        out.append((rung, copy.deepcopy(current)))
    return out


def _key(cfg: dict, *parts: str) -> str:
    """The settings a folder's content depends on, as canonical JSON (equal keys: one shared folder)."""
    picked = {p: cfg[p] for p in ("model", "dtype", "attn_implementation", "format", "data", *parts)}
    return json.dumps(picked, sort_keys=True)


def plan_ladder(config: dict, results: Path) -> list[Rung]:
    """Every rung with the folders it reads (the first rung that needs a folder owns it)."""
    if not config["ladder"]["tasks"]:
        raise ConfigError("ladder.tasks is empty: name the tasks the ladder evaluates")
    owners: dict[tuple[str, str], Path] = {}
    rungs = []
    for n, (entry, cfg) in enumerate(rung_configs(config)):
        tasks = cfg["ladder"]["tasks"]
        cfg["eval"] = {**cfg["eval"], "tasks": list(tasks)}
        base = results / "ladder" / f"rung{n}"
        rung = Rung(n, entry["name"], entry.get("why", ""), dict(entry.get("set") or {}), cfg,
                    owners.setdefault(("icl", _key(cfg, "eval")), base / "icl"))
        groups = [tuple(cfg["ft"]["tasks"])] if cfg["ft"]["tasks"] else [(t,) for t in tasks]
        for group in groups:
            ft_cfg = copy.deepcopy(cfg)
            ft_cfg["ft"] = {**cfg["ft"], "tasks": list(group)}
            ft_cfg["eval"] = {**cfg["eval"], "tasks": list(group), "shots": list(cfg["reproduce"]["ft_eval_shots"])}
            name = "+".join(group)
            ft_dir = owners.setdefault(("ft", _key(ft_cfg, "ft")), base / "ft" / name)
            eval_dir = owners.setdefault(("ft_eval", _key(ft_cfg, "ft", "eval")), base / "ft_eval" / name)
            rung.ft.append((group, ft_cfg, ft_dir, eval_dir))
        rungs.append(rung)
    return rungs


def run_ladder(config: dict, data_dir: Path, results: Path, show_progress: bool = True, finetune_fn=None,
               evaluate_fn=None) -> tuple[str, dict]:
    """Run (or resume) every rung; returns the report section and the ladder's numbers (also written
    to ``ladder/ladder.json`` with the section's plot in ``plots/ladder.png``)."""
    from .evaluate import EvalPlan, evaluate
    from .io import write_json
    from .report.ladder import ladder_section, ladder_summary
    from .study import fit_and_evaluate

    evaluate_fn = evaluate_fn or evaluate
    rungs = plan_ladder(config, results)
    for rung in rungs:
        evaluate_fn(EvalPlan(rung.config, data_dir, rung.icl_dir, rung.config["model"], None),
                    show_progress=show_progress)
        for _group, ft_cfg, ft_dir, eval_dir in rung.ft:
            fit_and_evaluate(ft_cfg, ft_dir, eval_dir, data_dir, show_progress, finetune_fn, evaluate_fn)
    summary = ladder_summary(rungs, config)
    write_json(results / "ladder" / "ladder.json", summary)
    return ladder_section(summary, results / "plots", link_prefix="plots/"), summary
