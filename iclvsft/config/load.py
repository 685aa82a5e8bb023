"""Loading a config: the defaults (:mod:`.schema`), then a YAML file, then CLI overrides, each key and
value checked before any heavy import, into a frozen :class:`Config`.

A key that is not in the schema is an error (with the closest valid key suggested), and a value must
have the default's type. Mappings listed in ``OPEN`` take any keys and are checked by their owner
(``data.task_params.<task>`` by the task's config dataclass). Overrides use dotted keys: ``data.seed=3``
or ``data.tasks=[expression,code]``; values are parsed as YAML.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..io import load_yaml
from ..tasks import get_task, task_in_format
from .schema import DEFAULTS, Config, FtConfig, _need

OPEN = {("data", "task_params"), ("reproduce", "ft_protocols"), ("reproduce", "ft_protocol_tasks"),
        ("reproduce", "ft_protocol_n_train")}

# Keys whose value may be a string or a list of strings (LoRA target modules: "all-linear" or
# [q_proj, v_proj]); _check_type accepts exactly those two shapes for them, nothing else.
STR_OR_LIST = {"ft.lora.target_modules", "ft.report_to"}


def schema_field(dotted: str) -> dataclasses.Field:
    """The schema field of a dotted key (``circuits.n_items``): its type, default, help and checks."""
    cls: Any = Config
    parts = dotted.split(".")
    for n, part in enumerate(parts):
        found = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if found is None:
            raise KeyError(dotted)
        if n == len(parts) - 1:
            return found
        cls = found.metadata.get("section")
        if cls is None:
            raise KeyError(dotted)
    raise KeyError(dotted)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(dotted: str, value: Any, default: Any) -> None:
    if default is None or value is None:
        return
    if dotted in STR_OR_LIST:
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ConfigError(f"config key {dotted!r} must be a string or a list of strings, got {value!r}")
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
        if (*path, key) in OPEN:  # an open mapping is replaced, not merged: `ft_protocols: {}` means none
            _check_type(dotted, value, base[key])
            out[key] = copy.deepcopy(value)
        elif isinstance(base[key], dict):
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
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e})") from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string; a number is meant
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()) else value
        except ValueError:
            pass
    return nest(key.strip(), value)


def nest(dotted: str, value: Any) -> dict:
    """``("data.seed", 3)`` -> ``{"data": {"seed": 3}}``: a dotted key as the nested mapping ``merge`` takes."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: Iterable[str | dict] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then each override (``"a.b=v"`` or a nested dict)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; the presets are in configs/ (cpu.yaml, quick.yaml, paper.yaml)")
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        config = merge(config, loaded, str(path))
        config["name"] = config["name"] or path.stem
    for override in overrides:
        update = parse_override(override) if isinstance(override, str) else override
        config = merge(config, update, "command line")
    return build(config)


def build(values: dict) -> Config:
    """A :class:`Config` from a merged, type-checked dict: each key's choices and range, each section's own
    cross-key check, then the checks across sections."""
    config = _build(Config, values, "", values)
    for protocol in config.reproduce.ft_protocols:
        protocol_ft(config, protocol)
    if config.prompt_format != "ours":
        for name in config.eval_tasks:
            task_in_format(get_task(name), config.prompt_format)  # one line for a task without that format
    return config


def derive(config: Config, changes: dict[str, Any], where: str = "config") -> Config:
    """``config`` with ``changes`` (dotted keys -> values, e.g. ``{"ft.tasks": ["code"], "model": m}``; a value
    may be a whole section as a mapping) applied and checked again like a config file: the one way to
    make a variant of a config."""
    values = config.to_dict()
    for key, value in changes.items():
        values = merge(values, nest(key, value), where)
    return build(values)


def check_section(name: str, values: dict, config: dict) -> dict:
    """One section (``values``: merged and type-checked) against its schema: each key's choices and
    range, then the section's own cross-key ``check``. Returns it with normalised values (task lists
    parsed), in schema order."""
    return _build(schema_field(name).metadata["section"], values, name, config).to_dict()


def protocol_ft(config: Config, protocol: str) -> FtConfig:
    """The ft section FT protocol ``protocol`` trains with: ``config.ft`` and the protocol's overrides
    (``reproduce.ft_protocols``), merged and checked like any ft section."""
    overrides = config.reproduce.ft_protocols[protocol] or {}
    values = config.to_dict()
    ft = merge(values["ft"], overrides, f"reproduce.ft_protocols.{protocol}", ("ft",))
    return _build(FtConfig, ft, "ft", values)


def _check_value(f: dataclasses.Field, value: Any, dotted: str) -> None:
    # YAML reads .inf and .nan as floats; no key means either (ft.epochs=.inf would train forever, a nan
    # passes no comparison and slips through every range check below).
    _need(not isinstance(value, float) or math.isfinite(value), f"{dotted} must be a finite number, got {value!r}")
    choices, lo, below = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("below")
    _need(choices is None or value in choices, f"{dotted} must be one of {', '.join(choices or ())}, got {value!r}")
    _need(lo is None or value >= lo, f"{dotted} must be >= {lo}, got {value!r}")
    _need(below is None or value < below, f"{dotted} must be in [{lo}, {below}), got {value!r}")


def _build(cls: type, values: dict, where: str, config: dict) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{where}.{f.name}" if where else f.name
        sub = f.metadata.get("section")
        if sub is not None:
            kwargs[f.name] = _build(sub, values[f.name], dotted, config)
        else:
            _check_value(f, values[f.name], dotted)
            kwargs[f.name] = copy.deepcopy(values[f.name])
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(config)
    return obj
