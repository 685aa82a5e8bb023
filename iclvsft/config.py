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
import re
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
    # The model under study: an offline name (qwen2.5-coder-0.5b-instruct, ...), a hub id or a folder.
    "model": "qwen2.5-coder-0.5b-instruct",
    "dtype": "auto",  # auto (bf16 where the hardware runs it natively, else fp32) | bf16 | fp16 | fp32
    "attn_implementation": "auto",  # auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | eager
    "eval": {
        "tasks": [],  # empty: data.tasks
        "shots": [0, 4, 16],  # k demonstrations per prompt (0 = zero-shot)
        "demo_seeds": [0, 1, 2],  # one demo set per (k, demo seed); k = 0 runs once
        "demo_mode": "shared",  # shared: one demo set per cell, KV-cached | per_item: fresh demos per item (authors)
        "demo_split": "pattern",  # which train split demonstrations come from
        "splits": ["pattern", "control"],
        "limit": 0,  # items per split (0 = all)
        "batch_size": 16,
        "max_new_tokens": 0,  # 0: longest train answer + a margin, per task
        "constrained": True,  # also score binary tasks by the label's log-probability
    },
    "ft": {
        "method": "lora",  # lora (peft adapter, base frozen) | full (every parameter, fp32 master weights)
        "tasks": [],  # tasks trained together, n_train rows each (several = the paper's mixed file); empty: --task
        "n_train": 256,  # rows per task: the first N pattern rows of <data>/<task>/train.jsonl (same N, same rows)
        "train_seed": 0,  # seeds the mixed-task shuffle, LoRA init, dropout and the epoch order
        "loss_on": "completion",  # completion (answer tokens only) | sequence (prompt + answer: the authors')
        "append_eos": True,  # end each completion with the eos token (teaches stopping); the authors did not
        "epochs": 2.0,  # passes over the rows; ignored when max_steps > 0
        "max_steps": 0,  # > 0: exactly this many optimizer steps (the authors: 100), overrides epochs
        "learning_rate": 2.0e-4,  # peak learning rate (the authors' full FT: 1e-5)
        "lr_scheduler": "linear",  # linear | cosine | cosine_with_restarts | polynomial | constant | constant_with_warmup | inverse_sqrt
        "warmup_steps": 0,  # optimizer steps of linear warm-up (the authors: 20)
        "weight_decay": 0.0,  # AdamW weight decay
        "max_grad_norm": 1.0,  # gradient clipping norm (0: no clipping)
        "optimizer": "adamw_torch",  # a transformers optimizer name (TrainingArguments.optim)
        "batch_size": 16,  # effective rows per optimizer step = per_device_batch_size x devices x accumulation
        "per_device_batch_size": 4,  # rows per forward pass on one device; accumulation makes up batch_size
        "max_length": 512,  # max tokens per row; longer rows are cut at the end (a row left with no answer token: error)
        "batching": "padding_free",  # padding_free (rows concatenated, positions restart per row, no padding) | padded (right-pad to the longest row) | max_length (pad every row to max_length: the authors')
        "gradient_checkpointing": False,  # recompute activations in the backward pass: less memory, slower
        "save_steps": 50,  # a resumable checkpoint every N optimizer steps (0: none)
        "keep_checkpoints": False,  # keep <out>/checkpoints after the run finishes (they hold the optimizer state)
        "logging_steps": 1,  # a train_log.jsonl line every N optimizer steps
        "lora": {
            "r": 16,  # adapter rank
            "alpha": 32,  # scaling numerator: the update is (alpha / r) * B @ A
            "dropout": 0.05,  # dropout on the adapter's input
            "target_modules": "all-linear",  # all-linear (every linear layer but the output head) or a list of module names, e.g. [q_proj, v_proj]
        },
    },
    # reproduce.py: the whole study for this config (iclvsft/study.py).
    "reproduce": {
        "models": [],  # models to study, each gets the full sweep; empty: [model]
        "icl": True,  # the ICL sweep of the eval section (shots x demo seeds) on the base model
        "ft_tasks": [],  # tasks fine-tuned one at a time; empty: data.tasks
        "ft_n_train": [16, 64, 256],  # FT rows per task (the first N pattern rows)
        "ft_train_seeds": [0],  # one fine-tuned model per (protocol, tasks, N, seed)
        # FT protocols: name -> overrides of the ft section. A protocol that sets `tasks` trains one
        # model on those tasks mixed (the paper's setting) and evaluates it on each of them.
        "ft_protocols": {"answer_lora": {}},
        "ft_protocol_tasks": {},  # protocol name -> tasks it runs on (default: ft_tasks)
        "ft_protocol_n_train": {},  # protocol name -> its N values (default: ft_n_train)
        "ft_eval_shots": [0],  # shots when evaluating fine-tuned models (0: zero-shot, the protocol)
    },
    # Circuit shift (analyze_circuits.py, iclvsft/circuits.py): which heads and MLPs carry the answer
    # under base zero-shot, base + k demonstrations, and base + fine-tuned adapter (zero-shot).
    "circuits": {
        "enabled": False,  # reproduce.py runs the analysis (and adds its report section) only when true
        "tasks": ["expression"],  # tasks to analyse; each needs a corruption (expression, boolean, relation, parity)
        "split": "pattern",  # test split the clean items come from (pattern | control)
        "n_items": 32,  # clean/corrupted pairs per task: the first test items that have a usable twin
        "shots": 4,  # k demonstrations in the ICL condition (the first k of evaluate.demo_order)
        "demo_seed": 0,  # the ICL condition's demo set (one set, the same for every item)
        "corruption": "answer",  # answer: minimal edit of what the answer is read from (expression: S) | control: expression's Z edited (the control twin)
        "method": "attribution",  # attribution (gradient x activation difference, fast) | activation (exact patching, one pass per component) | both
        "activation_items": 0,  # with method attribution: also exact-patch the first N pairs, to check the approximation
        "batch_size": 32,  # patched copies per forward pass in activation patching
        "dtype": "fp32",  # the analysis' precision; fp32 because bf16 logits near 20 are 0.125 apart, coarser than many effects; "" = the top-level dtype
        "adapter": "",  # the FT condition's adapter folder, "{task}" replaced by the task (e.g. runs/ft-{task}-256); empty: no FT condition
        "bootstrap": 1000,  # bootstrap resamples of the items for the 95% intervals (0: none)
        "top_k": 20,  # components compared by the top-k overlap
        "seed": 0,  # seeds the choice of corruption edits and the bootstrap
    },
}

OPEN = {("data", "task_params"), ("reproduce", "ft_protocols"), ("reproduce", "ft_protocol_tasks"),
        ("reproduce", "ft_protocol_n_train")}


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Keys whose value may be a string or a list of strings (LoRA target modules: "all-linear" or
# [q_proj, v_proj]); _check_type accepts exactly those two shapes for them, nothing else.
STR_OR_LIST = {"ft.lora.target_modules"}


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
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string; a number is meant
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()) else value
        except ValueError:
            pass
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

    from .train import validate_ft_config

    validate_ft_config(config)  # the ft section's own checks (iclvsft/train.py)

    from .circuits import validate_circuits_config

    validate_circuits_config(config)  # the circuits section's own checks (iclvsft/circuits.py)
