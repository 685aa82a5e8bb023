"""What a config implies, as named values: the models it studies, its FT runs, its ladder rungs and the
folders each writes. Pure (no I/O, no heavy import): :mod:`iclvsft.study` runs these jobs,
:mod:`iclvsft.plan` estimates them and :mod:`iclvsft.ladder` runs the rungs, all from this one list.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .config import Config, FtConfig, derive, protocol_ft
from .errors import ConfigError
from .io import slug
from .tasks.formats import train_format


def task_groups(ft: FtConfig, tasks: list[str]) -> list[tuple[str, ...]]:
    """The models an ft section trains over ``tasks``: one on ``ft.tasks`` mixed when it names tasks (the
    paper's mixed file), else one per task."""
    return [tuple(ft.tasks)] if ft.tasks else [(t,) for t in tasks]


def with_eval(config: Config, model: str, tasks: list[str] | tuple[str, ...], shots: list[int]) -> Config:
    """``config`` evaluating ``model`` on ``tasks`` with ``shots`` demonstrations."""
    return derive(config, {"model": model, "eval.tasks": list(tasks), "eval.shots": list(shots)})


@dataclass(frozen=True)
class FTRun:
    """One fine-tuned model of the study: trained on ``tasks`` (one, or the mixed set) with ``config``."""

    model: str
    protocol: str
    tasks: tuple[str, ...]
    n_train: int
    train_seed: int
    config: Config  # the full config with this run's model and ft section

    @property
    def rel(self) -> Path:
        return Path(slug(self.model)) / self.protocol / "+".join(self.tasks) / f"n{self.n_train}-s{self.train_seed}"

    @property
    def eval_config(self) -> Config:
        """The config its zero-shot (``reproduce.ft_eval_shots``) evaluation runs with."""
        return with_eval(self.config, self.model, self.tasks, self.config.reproduce.ft_eval_shots)


def plan_ft(config: Config) -> list[FTRun]:
    """Every FT run of the study: model x protocol x task group x N x train seed."""
    rep = config.reproduce
    runs = []
    for model in config.models:
        for protocol in rep.ft_protocols:
            ft = protocol_ft(config, protocol)
            tasks = rep.ft_protocol_tasks.get(protocol) or config.ft_tasks
            unknown = [t for t in tasks if t not in config.data.tasks]
            if unknown:
                raise ConfigError(f"reproduce: protocol {protocol!r} uses tasks {unknown} that data.tasks does not generate")
            ns = rep.ft_protocol_n_train.get(protocol) or rep.ft_n_train
            compared = protocol == (rep.compare_protocol or next(iter(rep.ft_protocols)))
            compared_n = rep.compare_n_train or max(ns)
            for group in task_groups(ft, tasks):
                for n in ns:
                    seeds = rep.compare_train_seeds if compared and n == compared_n and rep.compare_train_seeds \
                        else rep.ft_train_seeds
                    for seed in seeds:
                        cfg = derive(config, {"model": model, "ft": {**ft.to_dict(), "tasks": list(group),
                                                                     "n_train": n, "train_seed": seed}})
                        runs.append(FTRun(model, protocol, group, n, seed, cfg))
    return runs


class RungFT(NamedTuple):
    """One fine-tuned model of a ladder rung (its tasks, train seed) and the folders it is trained into and
    evaluated in."""

    tasks: tuple[str, ...]
    config: Config
    ft_dir: Path
    eval_dir: Path
    seed: int = 0


@dataclass
class Rung:
    index: int
    name: str
    why: str
    changes: dict  # the dotted keys this rung sets (rung 0: the authors' setup)
    config: Config  # the resolved config of this rung (ladder.rungs emptied)
    icl_dir: Path
    ft: list[RungFT] = field(default_factory=list)
    data_name: str = ""  # "": the study's data folder; else the sibling folder "<data>-<data_name>" it reads

    def data_dir(self, study_data: Path) -> Path:
        """The data folder this rung reads: the study's, or (its data section differs) a sibling of it."""
        return study_data if not self.data_name else study_data.with_name(f"{study_data.name}-{self.data_name}")

    @property
    def tasks(self) -> list[str]:
        return list(self.config.ladder.tasks)


def rung_configs(config: Config) -> list[tuple[dict, Config]]:
    """(rung entry, resolved config) per rung, each rung's ``set`` applied over the previous rung's
    config; every one checked like a config file, so a bad key fails before any work."""
    out, current = [], derive(config, {"ladder.rungs": []})
    for n, rung in enumerate(config.ladder.rungs):
        current = derive(current, {str(k): v for k, v in (rung.get("set") or {}).items()},
                         f"ladder.rungs[{n}] ({rung['name']})")
        out.append((rung, current))
    return out


def _data_name(config: Config, rung: Config) -> str:
    """"" when a rung reads the study's data; else a name for its own folder (its distribution, and a hash
    of its data section when more than the distribution differs)."""
    ours, its = config.data.to_dict(), rung.data.to_dict()
    if its == ours:
        return ""
    if {k: v for k, v in its.items() if k != "distribution"} == {k: v for k, v in ours.items() if k != "distribution"}:
        return its["distribution"]
    return f"{its['distribution']}-{hashlib.sha256(json.dumps(its, sort_keys=True).encode()).hexdigest()[:8]}"


def _key(cfg: Config, *parts: str) -> str:
    """The settings a folder's content depends on, as canonical JSON (equal keys: one shared folder)."""
    values = cfg.to_dict()
    picked = {p: values[p] for p in ("model", "dtype", "attn_implementation", "data", *parts)}
    # a fine-tuned model depends on the factors of the format its rows show; its evaluation on them all
    picked["format"] = train_format(cfg.prompt_format, cfg.ft.rows) if parts == ("ft",) else cfg.prompt_format
    return json.dumps(picked, sort_keys=True)


def plan_ladder(config: Config, results: Path) -> list[Rung]:
    """Every rung with the folders it reads (the first rung that needs a folder owns it)."""
    if not config.ladder.tasks:
        raise ConfigError("ladder.tasks is empty: name the tasks the ladder evaluates")
    owners: dict[tuple[str, str], Path] = {}
    rungs = []
    configs = rung_configs(config)
    # the first rung once more on each of ladder.first_rung_models, right after it
    other = {"ladder.train_seeds": list(config.ladder.first_rung_seeds)} if config.ladder.first_rung_seeds else {}
    steps = [(0, *configs[0], "")] + [(0, configs[0][0], derive(configs[0][1], {"model": m, **other}), str(m))
                                      for m in config.ladder.first_rung_models] if configs else []
    steps += [(n, entry, cfg, "") for n, (entry, cfg) in enumerate(configs) if n > 0]
    for n, entry, cfg, other in steps:
        tasks = list(cfg.ladder.tasks)
        cfg = derive(cfg, {"eval.tasks": tasks})
        base = results / "ladder" / (f"rung{n}" + (f"-{slug(other)}" if other else ""))
        name = entry["name"] + (f" on {other}" if other else "")
        rung = Rung(n, name, entry.get("why", ""), dict(entry.get("set") or {}), cfg,
                    owners.setdefault(("icl", _key(cfg, "eval")), base / "icl"), data_name=_data_name(config, cfg))
        for group in task_groups(cfg.ft, tasks):
            for seed in cfg.ladder.train_seeds:
                ft_cfg = derive(cfg, {"ft.tasks": list(group), "ft.train_seed": seed, "eval.tasks": list(group),
                                      "eval.shots": list(cfg.reproduce.ft_eval_shots)})
                name = "+".join(group) + ("" if cfg.ladder.train_seeds == [0] else f"/s{seed}")
                ft_dir = owners.setdefault(("ft", _key(ft_cfg, "ft")), base / "ft" / name)
                eval_dir = owners.setdefault(("ft_eval", _key(ft_cfg, "ft", "eval")), base / "ft_eval" / name)
                rung.ft.append(RungFT(group, ft_cfg, ft_dir, eval_dir, seed))
        rungs.append(rung)
    return rungs
