"""One fine-tuning run into one output folder: identity, resume, training, summary (finetune.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from ..cards import write_model_card
from ..config import Config
from ..errors import ConfigError
from ..io import atomic_write_text, provenance, write_json
from ..models import OFFLINE_MODELS, peak_memory_bytes, weights_identity
from ..runs import compare_identity, summarise_differences
from ..tasks.formats import train_format
from ..writers import check_folder, clear_folder, entries, writing
from .loss import RowIndexCollator, RowMeanTrainer
from .rows import LabelledLogitsTrainer, make_collator, select_rows, tokenize_rows
from .setup import (
    CHECKPOINT_DIR,
    LossProgressCallback,
    Precision,
    TrainLogCallback,
    build_model,
    gradient_accumulation,
    plan_precision,
    training_arguments,
    training_attention,
    training_device,
)

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"
LOG_FILE = "train_log.jsonl"
# ft.report_to's files (tensorboard's event files) go here, beside the run, not under checkpoints/ (which
# is removed when the run finishes unless ft.keep_checkpoints): the Trainer's default is checkpoints/runs/.
REPORT_DIR = "runs"
SUMMARY_FILE = "summary.json"
# ft keys that change neither the data nor the optimisation: a resumed run may differ in these.
NON_SEMANTIC_FT_KEYS = ("save_steps", "keep_checkpoints", "logging_steps", "report_to")
# ft keys added after runs were recorded, at the value every earlier run trained with: left out of the
# identity at that value, so runs recorded before the key existed stay the same run.
DEFAULT_ADDED_FT = {"loss_average": "tokens", "param_dtype": "fp32"}


def default_out_dir(config: Config) -> Path:
    """``runs/ft-<task+task>-<N>-<method>``: where finetune.py writes when --out is not given."""
    ft = config.ft
    return Path("runs") / f"ft-{'+'.join(ft.tasks)}-{ft.n_train}-{ft.method}"


# --- the output folder ----------------------------------------------------------------------------

def run_identity(config: Config, data_record: dict) -> dict[str, Any]:
    """What must match for a rerun into the same folder to resume it: the base model (by content where it
    has content to hash), precision, format, ft, the rows (per task the train file's sha256)."""
    ft = {k: v for k, v in config.ft.to_dict().items() if k not in NON_SEMANTIC_FT_KEYS
          and DEFAULT_ADDED_FT.get(k, object()) != v}
    return {"model": config.model, "model_sha256": weights_identity(config.model), "dtype": config.dtype,
            "attn_implementation": config.attn_implementation,
            "format": train_format(config.prompt_format, config.ft.rows),
            "prompt_style": config.prompt_style, "ft": ft,
            "rows": data_record}


def inspect_output(out: Path, identity: dict, overwrite: bool) -> str:
    """What to do with ``out``: ``new`` (absent or empty), ``resume`` (same run, unfinished) or ``clear``.

    Read-only, so every process can call it. Raises :class:`ConfigError` for a finished run without
    ``overwrite``, for an unfinished run made with another config, and for a non-empty folder that is
    not a finetune output (never deleted, even with ``overwrite``).
    """
    check_folder(out)
    if not out.exists():
        return "new"
    if not entries(out):  # empty but for its writer lock
        return "new"
    if not (out / RUN_CONFIG_FILE).is_file():
        raise ConfigError(f"is not empty and holds no {RUN_CONFIG_FILE}: not a finetune.py output folder, so it "
                          "is left alone", "another_out", out=out)
    if overwrite:
        return "clear"
    if (out / SUMMARY_FILE).is_file():
        raise ConfigError(f"{out} holds a finished run ({SUMMARY_FILE})", "overwrite_train", "another_out")
    diff = compare_identity(out / RUN_CONFIG_FILE, identity, remedies=("overwrite_start",))
    if diff:
        raise ConfigError(f"{out} holds an unfinished run with another config ({summarise_differences(diff)})",
                          "resume", "overwrite_start")
    return "resume"


def is_finished(config: Config, out: str | Path, data_dir: str | Path) -> bool:
    """True when ``out`` holds a finished run of exactly this config and these rows (reuse it);
    False when there is none yet or it is unfinished (finetune() resumes it). A finished run made
    with other settings raises ConfigError: reusing it would silently report the wrong model."""
    out = Path(out)
    if not (out / SUMMARY_FILE).is_file():
        return False
    ft = config.ft
    _, data_record = select_rows(data_dir, ft.tasks, ft.n_train, ft.train_seed, config.data.task_params,
                                 config.prompt_format, ft.rows)
    diff = compare_identity(out / RUN_CONFIG_FILE, run_identity(config, data_record), remedies=("move_run",))
    if diff is None:
        raise ConfigError(f"{out / RUN_CONFIG_FILE} is missing", "move_run")
    if diff:
        raise ConfigError(f"{out} holds a finished run made with other settings ({summarise_differences(diff)})",
                          "another_results", "move_run")
    return True


def discard_incomplete_checkpoints(out: Path) -> None:
    """Delete checkpoints cut short while saving (no ``trainer_state.json``): resuming skips them."""
    folder = out / CHECKPOINT_DIR
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    while found is not None and not (Path(found) / "trainer_state.json").is_file():
        logger.warning("deleting incomplete checkpoint %s", found)
        shutil.rmtree(found, ignore_errors=True)
        found = get_last_checkpoint(str(folder))


def last_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoints/checkpoint-<step>`` (call :func:`discard_incomplete_checkpoints` first)."""
    folder = out / CHECKPOINT_DIR
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the summary (as written), the trained model and its tokenizer."""

    summary: dict[str, Any]
    model: Any = None
    tokenizer: Any = None
    out: Path | None = None
    trainer: Any = field(default=None, repr=False)


def loss_curve(history: list[dict]) -> dict[str, Any]:
    """First, last, minimum and per-decile training loss from a Trainer log history."""
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    if not losses:
        return {}
    tail = max(1, len(losses) // 10)
    marks = sorted({min(len(losses) - 1, round(i * (len(losses) - 1) / 10)) for i in range(11)})
    return {"first": losses[0][1], "last": losses[-1][1],
            "mean_last_10pct": round(sum(loss for _, loss in losses[-tail:]) / tail, 6),
            "min": min(loss for _, loss in losses), "by_decile": [[losses[i][0], losses[i][1]] for i in marks]}


def throughput(history: list[dict]) -> float | None:
    """Real input tokens per second over the logged steps (a resumed run's earlier steps included)."""
    timed = [e for e in history if e.get("seconds") and "tokens" in e]
    seconds = sum(e["seconds"] for e in timed)
    return round(sum(e["tokens"] for e in timed) / seconds, 2) if seconds else None


def finetune(config: Config, out: str | Path | None = None, data_dir: str | Path = "data", *, overwrite: bool = False,
             callbacks: Iterable[Any] = (), show_progress: bool = True) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.ft`` and write the output folder ``out``.

    ``config`` is a resolved config (:func:`iclvsft.config.load_config`) whose ``ft.tasks`` names at
    least one task. Resumes an unfinished run in ``out``; refuses a finished one unless ``overwrite``.
    ``callbacks`` are extra ``TrainerCallback`` objects (tests use one to interrupt a run). The
    folder's writer lock (:mod:`iclvsft.writers`) is held from its inspection to summary.json.
    Returns a :class:`FinetuneResult` (on every process; only the main one writes files).
    """
    started = time.perf_counter()
    ft = config.ft
    if not ft.tasks:
        raise ConfigError("no task to fine-tune on: pass --task (or set ft.tasks in the config)")
    out = Path(out) if out is not None else default_out_dir(config)
    rows, data_record = select_rows(data_dir, ft.tasks, ft.n_train, ft.train_seed,
                                    config.data.task_params, config.prompt_format, ft.rows)
    identity = run_identity(config, data_record)
    precision = plan_precision(config, training_device())
    args, sharded = _trainer_arguments(config, out, precision, show_progress)
    with writing(out, args.distributed_state):  # from the folder's inspection to summary.json
        action = inspect_output(out, identity, overwrite)
        if args.distributed_state is not None:  # every process has looked before the main one writes
            args.distributed_state.wait_for_everyone()
        resume = _prepare_folder(out, action, args, {"identity": identity, "config": config.to_dict(),
                                                     "data_dir": str(data_dir), "out": str(out)})
        return _run(config, out, data_dir, rows, data_record, precision, args, sharded, resume, callbacks,
                    show_progress, started)


def _run(config: Config, out: Path, data_dir, rows, data_record, precision, args, sharded, resume, callbacks,
         show_progress, started) -> FinetuneResult:
    """The run itself, in a folder prepared for it: build the model, tokenize, train, write the summary."""
    ft = config.ft
    model, tokenizer, model_info = build_model(config, precision, args.device, sharded=sharded,
                                               show_progress=show_progress)
    if config.prompt_style != "raw":  # the rows' text needs the model's chat template
        rows, _ = select_rows(data_dir, ft.tasks, ft.n_train, ft.train_seed, config.data.task_params,
                              config.prompt_format, ft.rows, style=config.prompt_style, tokenizer=tokenizer)
    features, token_stats = tokenize_rows(rows, tokenizer, loss_on=ft.loss_on, max_length=ft.max_length,
                                          append_eos=ft.append_eos)
    trainer, output, train_seconds = _train(config, out, args, model, tokenizer, model_info, features, token_stats,
                                            precision, resume, callbacks, show_progress)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    summary = _summary(config, trainer, output, precision, model_info, data_record, token_stats, resume,
                       train_seconds, time.perf_counter() - started)
    if args.process_index == 0:
        if not ft.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        point_adapter_at_base(out, model_info)
        write_model_card(out, config, summary)
        write_json(out / SUMMARY_FILE, summary)  # last: its presence marks the run finished
        logger.info("finished: %d steps, final loss %s, %.0f s; wrote %s", summary["steps"], summary["final_loss"],
                    summary["wall_seconds"], out)
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(summary=summary, model=unwrapped, tokenizer=tokenizer, out=out, trainer=trainer)


def _trainer_arguments(config: Config, out: Path, precision: Precision, show_progress: bool):
    """The Trainer's arguments, checked against the launcher; also whether the run is sharded."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gradient_accumulation(config, world_size)  # fail before loading anything
    args = training_arguments(config, out, precision, world_size, training_device(), show_progress=show_progress)
    if args.world_size != world_size:
        raise ConfigError(f"the launcher started {world_size} processes but the Trainer sees {args.world_size}; "
                          f"use `accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N`")
    distributed = args.distributed_state.distributed_type if args.distributed_state is not None else None
    return args, str(distributed).split(".")[-1] in ("DEEPSPEED", "FSDP")


def _prepare_folder(out: Path, action: str, args, run_config: dict) -> str | None:
    """Create (or clear) the folder on the main process; returns the checkpoint to resume from."""
    with args.main_process_first(local=False, desc="preparing the output folder"):
        if args.process_index == 0:
            if action == "clear":
                logger.info("--overwrite: removing the previous run in %s", out)
                clear_folder(out)  # not the folder itself: its lock is held
            out.mkdir(parents=True, exist_ok=True)
            if action != "resume":
                write_json(out / RUN_CONFIG_FILE, run_config)
            else:
                discard_incomplete_checkpoints(out)
    resume = last_checkpoint(out) if action == "resume" else None
    if resume:
        logger.info("resuming %s from %s", out, resume)
    return resume


def _train(config, out, args, model, tokenizer, model_info, features, token_stats, precision, resume, callbacks,
           show_progress):
    """Run the Trainer (resuming from ``resume``) and save the weights; returns (trainer, output, seconds)."""
    ft = config.ft
    collator = make_collator(ft.batching, tokenizer.pad_token_id, ft.max_length,
                             model_info["attn_implementation"], ft.logits_on)
    # each trainer class carries its loss (LabelledLogitsTrainer: labelled_logits_loss)
    trainer_class = LabelledLogitsTrainer if ft.logits_on == "labels" else Trainer
    if ft.loss_average == "rows":  # the loss needs each position's row: RowMeanTrainer computes it
        collator, trainer_class = RowIndexCollator(collator), RowMeanTrainer
    with warnings.catch_warnings():
        # peft looks the base model up on the hub to see whether the vocabulary was resized; offline
        # names are not hub ids, so the lookup fails and warns at every checkpoint. Harmless: we never resize.
        warnings.filterwarnings("ignore", message=r"(Unable to fetch remote file|Could not find a config file)")
        trainer = trainer_class(model=model, args=args, train_dataset=features, data_collator=collator,
                          processing_class=tokenizer,
                          callbacks=[TrainLogCallback(out / LOG_FILE), *callbacks])
        # Each step's log goes to train_log.jsonl (and report_to); the console gets a progress bar with the
        # loss, not a printed dict per step.
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(LossProgressCallback())
        keep_reports_in(trainer, out / REPORT_DIR)
        logger.info("fine-tuning %s (%s, %s) on %d rows of %s: %s tokens, batch %d = %d x %d devices x %d steps",
                    config.model, ft.method, precision.dtype, len(features), ",".join(ft.tasks),
                    f"{token_stats['tokens']:,}", ft.batch_size, ft.per_device_batch_size, args.world_size,
                    args.gradient_accumulation_steps)
        train_started = time.perf_counter()
        with training_attention(model_info["attn_implementation"], args.device):
            output = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - train_started
        base_config = getattr(trainer.accelerator.unwrap_model(trainer.model), "config", None)
        if base_config is not None:
            base_config.use_cache = True  # the saved model generates with a KV cache
        trainer.save_model(str(out))
    return trainer, output, train_seconds


def keep_reports_in(trainer: Trainer, folder: Path) -> None:
    """Point the Trainer's tensorboard logger at ``folder`` (unless TENSORBOARD_LOGGING_DIR chose a place)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(folder)


def point_adapter_at_base(out: Path, model_info: dict) -> None:
    """Make a saved adapter name a base that loads anywhere: an offline name is an alias only this project
    resolves, so ``base_model_name_or_path`` becomes the upstream Hub id it was made from
    (``AutoPeftModelForCausalLM.from_pretrained(out)`` loads that from the Hub; this project's loader maps
    it back to the offline copy, the weights trained on: ``models.offline.adapter_base``). The alias and
    the local folder stay in the model card's ``iclvsft`` metadata."""
    path = out / "adapter_config.json"
    if not path.is_file() or model_info.get("source") != "offline":
        return
    adapter = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = OFFLINE_MODELS[model_info["name"]].upstream
    atomic_write_text(path, json.dumps(adapter, indent=2, sort_keys=True) + "\n")


def _summary(config, trainer, output, precision, model_info, data_record, token_stats, resume, train_seconds,
             wall_seconds) -> dict[str, Any]:
    ft, args, state = config.ft, trainer.args, trainer.state
    return {
        "status": "finished",
        "model": config.model,
        "method": ft.method,
        "tasks": list(ft.tasks),
        "n_train": ft.n_train,
        "loss_on": ft.loss_on,
        "batching": ft.batching,
        "precision": vars(precision),
        "model_info": model_info,
        "data": data_record,
        "tokens_per_epoch": token_stats,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "effective_batch_size": ft.per_device_batch_size * args.gradient_accumulation_steps * args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "device": str(args.device),
        "final_loss": next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None),
        "train_loss": output.training_loss,
        "loss_curve": loss_curve(state.log_history),
        "input_tokens": state.num_input_tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
        "tokens_per_second": throughput(state.log_history),
        "peak_memory_gib": round(peak_memory_bytes(args.device) / 2**30, 3),
        "resumed_from": resume,
        "provenance": provenance(),
    }
