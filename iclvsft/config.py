"""Configs: YAML files over built-in defaults, then CLI overrides, every key checked.

A config is a nested dict. ``DEFAULTS`` below is the schema: a key that is not in it is an error
(with the closest valid key suggested), and a value must have the default's type. Mappings listed
in ``OPEN`` take any keys and are checked by their owner (``data.task_params.<task>`` by the task's
config dataclass). Overrides use dotted keys: ``data.seed=3`` or ``data.tasks=[expression,code]``;
values are parsed as YAML.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

ALL_TASKS = ["expression", "code", "boolean", "relation", "parity", "algebra"]

DEFAULTS: dict[str, Any] = {
    "name": "",  # the config's name (results/<name>/); defaults to the YAML file's stem
    "data": {
        "seed": 0,  # the data seed: every item's RNG derives from it (iclvsft.rng)
        "tasks": list(ALL_TASKS),
        "train_pattern": 4096,  # train pool rows per task (FT rows and ICL demonstrations)
        "train_control": 512,
        "test_pattern": 200,
        "test_control": 200,  # ignored by tasks without a control split (parity)
        "task_params": {},  # per-task generation parameters, e.g. {expression: {z_terms: [2, 3]}}
    },
}

OPEN = {("data", "task_params")}


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(dotted: str, value: Any, default: Any) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key {dotted!r} must be of type {type(default).__name__}, got {value!r}")


def merge(base: dict, update: dict, where: str, path: tuple[str, ...] = ()) -> dict:
    """``update`` merged into a copy of ``base``; unknown keys and wrong types raise ConfigError."""
    out = copy.deepcopy(base)
    if not isinstance(update, dict):
        raise ConfigError(f"{where}: {'.'.join(path) or 'the config'} must be a mapping, got {update!r}")
    for key, value in update.items():
        dotted = ".".join((*path, str(key)))
        if path in OPEN:
            out[key] = copy.deepcopy(value)
            continue
        if key not in base:
            raise ConfigError(f"{where}: unknown config key {dotted!r}{_suggest(str(key), base)}; "
                              f"valid keys here: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            out[key] = merge(base[key], value, where, (*path, key))
        else:
            _check_type(dotted, value, base[key])
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """``"data.seed=3"`` -> ``{"data": {"seed": 3}}``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. data.seed=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e})") from None
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str | dict] = ()) -> dict:
    """Defaults, then the YAML file at ``path``, then each override (``"a.b=v"`` or a nested dict)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; the presets are in configs/ (cpu.yaml, quick.yaml, paper.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        config = merge(config, loaded, str(path))
        config["name"] = config["name"] or path.stem
    for override in overrides:
        update = parse_override(override) if isinstance(override, str) else override
        config = merge(config, update, "command line")
    validate(config)
    return config


def validate(config: dict) -> None:
    """Checks that span keys; task parameters are checked by each task's config class."""
    from .tasks import get_task, parse_task_list

    data = config["data"]
    data["tasks"] = parse_task_list(data["tasks"])
    for key in ("train_pattern", "train_control", "test_pattern", "test_control"):
        if data[key] < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {data[key]}")
    for task, params in data["task_params"].items():
        get_task(task, params)  # raises ConfigError for an unknown task, key or bad value
