"""Accelerate config files checked against a config's ft section before a launch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import FtConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class AccelerateCheck:
    path: str
    distributed_type: str
    processes: int
    accumulation: int
    deepspeed_file: str | None


def read_accelerate_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"accelerate config {path}: cannot read it ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"accelerate config {path}: not a mapping")
    return data


def check_accelerate_config(path: str | Path, ft: FtConfig, num_processes: int | None = None,
                            root: str | Path | None = None) -> AccelerateCheck:
    """Check an accelerate config file against an ``ft`` section before launching: its process count
    (or ``--num_processes``) times ``ft.per_device_batch_size`` must divide ``ft.batch_size`` (the
    effective batch); a DeepSpeed file must exist and leave batch sizes "auto" or equal to the config's;
    precision must stay "no" (the config's dtype sets it). Raises :class:`ConfigError` naming the
    settings that would fit; returns what the launch will do."""
    path = Path(path)
    data = read_accelerate_config(path)
    kind = str(data.get("distributed_type", "NO"))
    processes = int(num_processes if num_processes is not None else data.get("num_processes", 1) or 1)
    if processes < 1:
        raise ConfigError(f"{path}: num_processes must be >= 1, got {processes}")
    per_step = ft.per_device_batch_size * processes
    if ft.batch_size % per_step:
        pd = [d for d in range(ft.per_device_batch_size, 0, -1) if ft.batch_size % (d * processes) == 0]
        procs = [n for n in range(processes, 0, -1) if ft.batch_size % (ft.per_device_batch_size * n) == 0]
        fixes = []
        if pd:
            fixes.append(f"ft.per_device_batch_size={pd[0]}")
        if procs:
            fixes.append(f"--num_processes {procs[0]}")
        raise ConfigError(f"{path}: {processes} processes x ft.per_device_batch_size {ft.per_device_batch_size} "
                          f"= {per_step} rows per pass does not divide ft.batch_size {ft.batch_size}; set "
                          + " or ".join(fixes))
    accumulation = ft.batch_size // per_step
    precision = str(data.get("mixed_precision", "no")).lower()
    if precision not in ("no", "none"):
        raise ConfigError(f"{path}: mixed_precision {precision!r}; keep it \"no\": the config's dtype sets the "
                          "precision (bf16 autocast over fp32 master weights for full FT)")
    ds_file = None
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        ds_file = ds.get("deepspeed_config_file")
        if not ds_file:
            raise ConfigError(f"{path}: distributed_type DEEPSPEED without deepspeed_config.deepspeed_config_file")
        candidates = [Path(ds_file)] + ([Path(root) / ds_file] if root else []) + \
                     [path.parent / Path(ds_file).name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: its DeepSpeed file {ds_file} does not exist (run from the checkout's root)")
        try:
            spec = json.loads(found.read_text())
        except ValueError as error:
            raise ConfigError(f"{found}: not JSON ({error})") from error
        expected = {"train_batch_size": ft.batch_size, "train_micro_batch_size_per_gpu": ft.per_device_batch_size,
                    "gradient_accumulation_steps": accumulation}
        for key, want in expected.items():
            value = spec.get(key, "auto")
            if value != "auto" and value != want:
                raise ConfigError(f"{found}: {key} {value} disagrees with the config ({want}); set it to \"auto\"")
        stage = (spec.get("zero_optimization") or {}).get("stage")
        offload = ((spec.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
        if offload not in (None, "none") and "optimizer" not in spec:
            raise ConfigError(f"{found}: offload_optimizer needs an \"optimizer\" section (DeepSpeed then builds its CPU "
                              "Adam; it refuses the Trainer's torch optimizer with offload): see ds_zero3_offload.json")
        if stage == 3 and processes == 1 and offload in (None, "none"):
            raise ConfigError(f"{path}: ZeRO-3 in one process without offload shards nothing (the whole model, "
                              "gradients and optimizer stay on the GPU); use deepspeed_zero3_offload.yaml or "
                              "--num_processes N")
    return AccelerateCheck(str(path), kind, processes, accumulation, str(ds_file) if ds_file else None)

