"""Fine-tuning: LoRA or full-parameter, one task or several mixed, single CPU to multi-GPU.

:func:`finetune` trains a model (any name :func:`iclvsft.models.load_model` resolves) on the first N
``pattern`` rows of each task's ``train.jsonl`` and writes one self-contained output folder. The
pieces, in order, each a public function the tests exercise on their own:

1. :func:`select_rows`: the first ``ft.n_train`` pattern items of every task (the same N always
   means the same rows), each turned into ``{prompt, completion}`` by :func:`iclvsft.prompts.ft_row`,
   the one template evaluation also uses. Several tasks (the paper's mixed setting) are concatenated
   and shuffled with ``ft.train_seed``.
2. :func:`tokenize_rows`: prompt and completion are tokenized **separately** and concatenated, so a
   row's prompt tokens are exactly the tokens evaluation feeds the model (``engine.encode`` tokenizes
   the prompt alone), and the completion tokens are what the model must generate after them. TRL's
   SFTTrainer tokenizes prompt + completion jointly and cuts where the two tokenizations diverge,
   which can differ from the inference context at the boundary; that is why tokenization is ours.
   Labels are ``-100`` on prompt tokens (``loss_on: completion``) or the whole row
   (``loss_on: sequence``, the authors' setting). Rows longer than ``ft.max_length`` are cut at the
   end; a row left without a single label token is an error naming the row.
3. Batching (``ft.batching``): ``padding_free`` (default) concatenates a batch's rows into one
   sequence with position ids restarting at every row (transformers' ``DataCollatorWithFlattening``).
   With SDPA/eager attention transformers derives a block-diagonal causal mask from those position
   ids (``masking_utils.find_packed_sequence_indices``); with FlashAttention-2 the collator also passes
   the cumulative sequence lengths. No token attends across rows and no padding is computed, and the
   number of rows per optimizer step is unchanged (unlike greedy packing into fixed-length blocks),
   so ``batch_size`` keeps the paper's meaning. ``padded`` right-pads to the batch's longest row;
   ``max_length`` pads every row to ``ft.max_length`` (the authors' 512, for the benchmark). The
   tests check that all three give the same loss on the same rows.
4. The model: LoRA via peft (``r``, ``alpha``, ``dropout``, ``target_modules``; the base stays
   frozen and bit-identical) or every parameter. Precision follows the top-level ``dtype`` (resolved
   by :mod:`iclvsft.models` for the training device): in bf16, LoRA keeps the frozen base in bf16 and
   the adapter in fp32; full FT loads fp32 master weights and trains under bf16 autocast
   (``TrainingArguments(bf16=True)``). FlashAttention-2 is used on CUDA when installed, else SDPA.
5. The transformers ``Trainer`` runs the loop: accelerate underneath, so ``accelerate launch`` with
   any file in ``configs/accelerate/`` (DDP, FSDP, DeepSpeed ZeRO-3) works unchanged; the loss is
   normalised by the number of label tokens across gradient-accumulation steps and devices, so
   packing, padding and the device count do not change it. ``ft.batch_size`` is the *effective*
   batch; gradient accumulation is derived from it, the per-device batch and the world size.

The output folder (``--out``)::

    adapter_config.json + adapter_model.safetensors   (LoRA)   or   config.json + model.safetensors (full)
    tokenizer files                                    the tokenizer, as evaluation loads it
    run_config.json                                    the resolved config, data files and their sha256
    train_log.jsonl                                    one line per logged step: loss, lr, grad norm, tokens/s
    summary.json                                       written last: the run finished (final loss, steps,
                                                       wall time, tokens, rows, provenance)
    checkpoints/checkpoint-<step>/                     while training (deleted at the end unless
                                                       ft.keep_checkpoints)

Rerunning into a folder without ``summary.json`` resumes from its last checkpoint (the config must
be the same); a finished folder is refused unless ``overwrite=True``. Only the main process writes.
The JSON files are written atomically; the weights by ``save_pretrained``, and ``summary.json``,
written after them, is what marks a run finished (a crash while saving leaves a resumable folder).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

METHODS = ("lora", "full")
LOSS_ON = ("completion", "sequence")
BATCHING = ("padding_free", "padded", "max_length")
# transformers schedulers that need no extra arguments (tests check they exist in transformers).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# Attention implementations that honour position-id packing (block-diagonal mask / varlen kernels).
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")

RUN_CONFIG_FILE = "run_config.json"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
# ft keys that change neither the data nor the optimisation: a resumed run may differ in these.
NON_SEMANTIC_FT_KEYS = ("save_steps", "keep_checkpoints", "logging_steps")


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------

def validate_ft_config(config: dict) -> None:
    """Checks on the ``ft`` section beyond types (called by :func:`iclvsft.config.validate`).

    Cheap on purpose (no torch/transformers import): every script loads a config.
    """
    from .tasks import parse_task_list

    ft = config["ft"]

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(ft["method"] in METHODS, f"ft.method must be one of {', '.join(METHODS)}, got {ft['method']!r}")
    need(ft["loss_on"] in LOSS_ON, f"ft.loss_on must be one of {', '.join(LOSS_ON)}, got {ft['loss_on']!r}")
    need(ft["batching"] in BATCHING, f"ft.batching must be one of {', '.join(BATCHING)}, got {ft['batching']!r}")
    if ft["tasks"]:
        ft["tasks"] = parse_task_list(ft["tasks"])
    need(ft["n_train"] >= 1, f"ft.n_train must be >= 1, got {ft['n_train']}")
    need(ft["max_steps"] >= 0, f"ft.max_steps must be >= 0 (0: use ft.epochs), got {ft['max_steps']}")
    need(ft["max_steps"] > 0 or ft["epochs"] > 0, f"ft.epochs must be > 0 when ft.max_steps is 0, got {ft['epochs']}")
    need(ft["learning_rate"] > 0, f"ft.learning_rate must be > 0, got {ft['learning_rate']}")
    need(ft["lr_scheduler"] in LR_SCHEDULERS,
         f"ft.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {ft['lr_scheduler']!r}")
    need(ft["warmup_steps"] >= 0, f"ft.warmup_steps must be >= 0, got {ft['warmup_steps']}")
    need(ft["weight_decay"] >= 0, f"ft.weight_decay must be >= 0, got {ft['weight_decay']}")
    need(ft["max_grad_norm"] >= 0, f"ft.max_grad_norm must be >= 0 (0: no clipping), got {ft['max_grad_norm']}")
    need(ft["per_device_batch_size"] >= 1, f"ft.per_device_batch_size must be >= 1, got {ft['per_device_batch_size']}")
    need(ft["batch_size"] >= 1 and ft["batch_size"] % ft["per_device_batch_size"] == 0,
         f"ft.batch_size ({ft['batch_size']}, rows per optimizer step) must be a positive multiple of "
         f"ft.per_device_batch_size ({ft['per_device_batch_size']})")
    need(ft["max_length"] >= 2, f"ft.max_length must be >= 2, got {ft['max_length']}")
    need(ft["save_steps"] >= 0, f"ft.save_steps must be >= 0 (0: no intermediate checkpoints), got {ft['save_steps']}")
    need(ft["logging_steps"] >= 1, f"ft.logging_steps must be >= 1, got {ft['logging_steps']}")
    need(bool(ft["optimizer"]), "ft.optimizer must name a transformers optimizer, e.g. adamw_torch")
    lora = ft["lora"]
    need(lora["r"] >= 1, f"ft.lora.r must be >= 1, got {lora['r']}")
    need(lora["alpha"] > 0, f"ft.lora.alpha must be > 0, got {lora['alpha']}")
    need(0 <= lora["dropout"] < 1, f"ft.lora.dropout must be in [0, 1), got {lora['dropout']}")
    targets = lora["target_modules"]
    need(bool(targets) and (isinstance(targets, str) or all(isinstance(t, str) and t for t in targets)),
         f"ft.lora.target_modules must be 'all-linear' or a non-empty list of module names, got {targets!r}")


def gradient_accumulation(config: dict, world_size: int) -> int:
    """Accumulation steps so that per-device batch x devices x steps == ``ft.batch_size``."""
    ft = config["ft"]
    per_step = ft["per_device_batch_size"] * world_size
    if ft["batch_size"] % per_step:
        raise ConfigError(f"ft.batch_size {ft['batch_size']} is not a multiple of ft.per_device_batch_size "
                          f"{ft['per_device_batch_size']} x {world_size} processes; change one of them")
    return ft["batch_size"] // per_step


def default_out_dir(config: dict) -> Path:
    """``runs/ft-<task+task>-<N>-<method>``: where finetune.py writes when --out is not given."""
    ft = config["ft"]
    return Path("runs") / f"ft-{'+'.join(ft['tasks'])}-{ft['n_train']}-{ft['method']}"


# --------------------------------------------------------------------------------------------------
# rows and tokens
# --------------------------------------------------------------------------------------------------

def select_rows(data_dir: str | Path, tasks: Sequence[str], n_train: int, seed: int = 0,
                task_params: dict | None = None) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The first ``n_train`` pattern rows of each task as ``{id, task, prompt, completion}``.

    One task keeps file order (the Trainer shuffles each epoch); several are concatenated and
    shuffled with ``seed``. Also returns a record of where the rows came from (per task: the train
    file's sha256 from the manifest, first and last id; a sha256 over all row ids in order).
    """
    from .data import load_items, load_manifest
    from .prompts import ft_row
    from .tasks import get_task, parse_task_list

    tasks = parse_task_list(list(tasks))
    manifest = load_manifest(data_dir)
    rows: list[dict[str, str]] = []
    record: dict[str, Any] = {"tasks": {}}
    for name in tasks:
        task = get_task(name, (task_params or {}).get(name))
        items = load_items(data_dir, name, "train", split="pattern")
        if len(items) < n_train:
            raise DataError(f"{name}: {Path(data_dir) / name / 'train.jsonl'} holds {len(items)} pattern rows, "
                            f"ft.n_train asks for {n_train}; lower --n-train or regenerate the data with "
                            f"data.train_pattern >= {n_train}")
        chosen = items[:n_train]
        rows += [{"id": item.id, "task": name, **ft_row(task, item)} for item in chosen]
        record["tasks"][name] = {"rows": n_train, "first_id": chosen[0].id, "last_id": chosen[-1].id,
                                 "train_sha256": manifest["tasks"][name]["files"]["train"].get("sha256")}
    if len(tasks) > 1:
        random.Random(seed).shuffle(rows)
    record["rows"] = len(rows)
    record["ids_sha256"] = hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()
    return rows, record


def tokenize_rows(rows: Sequence[dict[str, str]], tokenizer, *, loss_on: str = "completion", max_length: int = 512,
                  append_eos: bool = True) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """``input_ids`` and ``labels`` per row, plus token statistics.

    ``input_ids = tokenize(prompt) + tokenize(completion) [+ eos]``: the prompt exactly as evaluation
    encodes it (special tokens included), the completion without special tokens. ``labels`` copy the
    ids where the loss applies and hold -100 elsewhere. A row longer than ``max_length`` is cut at the
    end; one that keeps no label token (the label of the first token is never a prediction target)
    raises :class:`DataError` naming the row.
    """
    if loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    eos = [tokenizer.eos_token_id] if append_eos else []
    if append_eos and tokenizer.eos_token_id is None:
        raise ConfigError("ft.append_eos is true but the tokenizer has no eos token; set ft.append_eos=false")
    features, truncated, label_tokens, tokens = [], [], 0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
        input_ids = prompt + completion
        labels = list(input_ids) if loss_on == "sequence" else [-100] * len(prompt) + completion
        if len(input_ids) > max_length:
            truncated.append(row["id"])
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        n_labels = sum(label != -100 for label in labels[1:])
        if n_labels == 0:
            raise DataError(f"row {row['id']}: prompt {len(prompt)} tokens + completion {len(completion)} tokens, "
                            f"cut to ft.max_length={max_length}, leaves no token to train on; raise ft.max_length "
                            f"(or use ft.loss_on=sequence)")
        label_tokens += n_labels
        tokens += len(input_ids)
        features.append({"input_ids": input_ids, "labels": labels})
    if truncated:
        logger.warning("%d of %d rows are longer than ft.max_length=%d and were cut at the end (e.g. %s)",
                       len(truncated), len(rows), max_length, ", ".join(truncated[:3]))
    lengths = [len(f["input_ids"]) for f in features]
    stats = {"rows": len(features), "tokens": tokens, "label_tokens": label_tokens, "truncated_rows": len(truncated),
             "max_row_tokens": max(lengths, default=0), "mean_row_tokens": round(tokens / max(len(features), 1), 2)}
    return features, stats


@dataclass
class PaddedCollator:
    """Right-pads a batch to its longest row (``pad_to=None``) or to ``pad_to`` tokens.

    Hand-rolled because transformers' collators pad on the tokenizer's side, and ours pads left for
    batched generation; training needs right padding so every real token keeps the position it has
    in an unpadded row (left padding would shift positions unless position ids were passed).
    """

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        length = max(self.pad_to or 0, longest)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(batching: str, pad_token_id: int, max_length: int, attn_implementation: str | None = None):
    """The collator for ``ft.batching`` (see the module docstring)."""
    if batching == "padding_free":
        from transformers import DataCollatorWithFlattening

        class PaddingFreeCollator(DataCollatorWithFlattening):
            """``DataCollatorWithFlattening`` whose batches also carry ``use_cache=False``.

            transformers builds the block-diagonal mask from restarting position ids only when the
            forward pass has no KV cache; a model whose config says ``use_cache=True`` (every model
            as loaded for generation) would silently create one and let rows attend to each other.
            The Trainer turns the cache off, but the batch itself should be correct in any forward.
            """

            def __call__(self, features, return_tensors=None, separator_id=None):
                return {**super().__call__(features, return_tensors, separator_id), "use_cache": False}

        flash = bool(attn_implementation and attn_implementation.startswith("flash_attention"))
        return PaddingFreeCollator(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=flash)
    if batching == "padded":
        return PaddedCollator(pad_token_id)
    if batching == "max_length":
        return PaddedCollator(pad_token_id, pad_to=max_length)
    raise ConfigError(f"ft.batching must be one of {', '.join(BATCHING)}, got {batching!r}")


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

@dataclass
class Precision:
    """How a run uses its dtype: the parameters' load dtype and the autocast flag for the Trainer."""

    dtype: str  # the resolved training precision: float32 | bfloat16 | float16
    load_dtype: str  # what the weights are loaded in (full FT: fp32 master weights under autocast)
    bf16: bool
    fp16: bool


def plan_precision(config: dict, device) -> Precision:
    """Resolve ``config['dtype']`` for ``device`` (see :func:`iclvsft.models.resolve_dtype`) and ``ft.method``."""
    import torch

    from .models import resolve_dtype

    dtype = resolve_dtype(config["dtype"], device, name=config["model"])
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return Precision(name, "float32", bf16=False, fp16=False)
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        raise ConfigError("dtype fp16 trains only on CUDA (it needs a gradient scaler); use bf16 or fp32 here")
    # LoRA: the frozen base may live in half precision (the adapter is fp32, peft's default).
    # Full: fp32 master weights; the half-precision math comes from autocast.
    load = name if config["ft"]["method"] == "lora" else "float32"
    return Precision(name, load, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def build_model(config: dict, precision: Precision, device, sharded: bool = False):
    """Load the model for training: LoRA-wrapped (peft) or all parameters trainable.

    ``device``: where training runs. Sharded runs (FSDP, DeepSpeed ZeRO-3) load on CPU and let the
    Trainer place the shards. FlashAttention-2 is switched on after loading when the weights are
    loaded on CPU (models.load_model accepts it only for a CUDA device).
    """
    import torch
    from transformers import set_seed

    from .models import load_model, resolve_attn_implementation

    ft = config["ft"]
    device = torch.device(device)
    load_dtype = getattr(torch, precision.load_dtype)
    attn = resolve_attn_implementation(config["attn_implementation"], device,
                                       getattr(torch, precision.dtype))
    load_device = "cpu" if sharded or device.type != "cuda" else str(device)
    switch_later = attn == "flash_attention_2" and load_device == "cpu"
    loaded = load_model(config["model"], dtype=precision.load_dtype, device=load_device,
                        attn_implementation="auto" if switch_later or attn is None else attn)
    model = loaded.model
    if switch_later:
        model.set_attn_implementation("flash_attention_2")
    if model.dtype != load_dtype:
        model = model.to(load_dtype)
    model.config.use_cache = False
    attn_used = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if ft["batching"] == "padding_free" and attn_used not in PACKING_SAFE_ATTENTION:
        raise ConfigError(f"ft.batching=padding_free needs an attention kernel that honours position-id packing "
                          f"({', '.join(PACKING_SAFE_ATTENTION)}); the model uses {attn_used!r}: set ft.batching=padded")
    set_seed(ft["train_seed"])  # LoRA initialisation
    if ft["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = ft["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as error:  # e.g. a target module name the model does not have
            raise ConfigError(f"ft.lora: {error}") from error
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    info = dict(loaded.info, attn_implementation=attn_used, load_dtype=precision.load_dtype,
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                total_params=sum(p.numel() for p in model.parameters()))
    return model, loaded.tokenizer, info


# --------------------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------------------

def run_identity(config: dict, data_record: dict) -> dict[str, Any]:
    """What must match for a rerun into the same folder to resume it: model, precision, ft, the rows."""
    ft = {k: v for k, v in config["ft"].items() if k not in NON_SEMANTIC_FT_KEYS}
    return {"model": config["model"], "dtype": config["dtype"], "attn_implementation": config["attn_implementation"],
            "ft": ft, "rows": data_record}


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def inspect_output(out: Path, identity: dict, overwrite: bool) -> str:
    """What to do with ``out``: ``new`` (absent or empty), ``resume`` (same run, unfinished) or ``clear``.

    Read-only, so every process can call it. Raises :class:`ConfigError` for a finished run without
    ``overwrite``, for an unfinished run made with another config, and for a non-empty folder that is
    not a finetune output (never deleted, even with ``overwrite``).
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if not any(out.iterdir()):
        return "new"
    if not (out / RUN_CONFIG_FILE).is_file():
        raise ConfigError(f"--out {out} is not empty and holds no {RUN_CONFIG_FILE}: not a finetune.py output "
                          f"folder, so it is left alone; choose another --out")
    if overwrite:
        return "clear"
    if (out / SUMMARY_FILE).is_file():
        raise ConfigError(f"{out} holds a finished run ({SUMMARY_FILE}); pass --overwrite to train it again "
                          f"or choose another --out")
    try:
        saved = json.loads((out / RUN_CONFIG_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{out / RUN_CONFIG_FILE} is unreadable; pass --overwrite to start over") from None
    diff = _differences(saved, json.loads(json.dumps(identity)))
    if diff:
        raise ConfigError(f"{out} holds an unfinished run with another config ({'; '.join(diff[:5])}); rerun with "
                          f"the same settings to resume it, or pass --overwrite to start over")
    return "resume"


def is_finished(config: dict, out: str | Path, data_dir: str | Path) -> bool:
    """True when ``out`` holds a finished run of exactly this config and these rows (reuse it);
    False when there is none yet or it is unfinished (finetune() resumes it). A finished run made
    with other settings raises ConfigError: reusing it would silently report the wrong model."""
    out = Path(out)
    if not (out / SUMMARY_FILE).is_file():
        return False
    ft = config["ft"]
    _, data_record = select_rows(data_dir, ft["tasks"], ft["n_train"], ft["train_seed"], config["data"]["task_params"])
    try:
        saved = json.loads((out / RUN_CONFIG_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{out / RUN_CONFIG_FILE} is unreadable; move {out} away to train it again") from None
    diff = _differences(saved, json.loads(json.dumps(run_identity(config, data_record))))
    if diff:
        raise ConfigError(f"{out} holds a finished run made with other settings ({'; '.join(diff[:5])}); "
                          "use another results folder, or move that run away to train it again")
    return True


def last_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoints/checkpoint-<step>`` that holds a trainer state, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = get_last_checkpoint(str(folder))
    # A checkpoint whose trainer_state.json is missing was cut short while saving: skip to the previous one.
    while found is not None and not (Path(found) / "trainer_state.json").is_file():
        logger.warning("ignoring incomplete checkpoint %s", found)
        shutil.rmtree(found, ignore_errors=True)
        found = get_last_checkpoint(str(folder))
    return found


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------

def make_log_callback(path: str | Path):
    """A ``TrainerCallback`` that adds seconds and tokens/s to each logged step and keeps ``path``
    (``train_log.jsonl``) equal to the log history.

    The file is rewritten (atomically) from ``state.log_history`` at every log, so after a resume it
    holds exactly the steps up to the checkpoint plus the new ones: no stale or duplicated lines.
    Only the world's main process writes. Tokens are real (non-padding) input tokens, summed over
    devices. (Built in a function so that importing this module, which config validation does,
    does not import transformers.)
    """
    from transformers import TrainerCallback

    from .io import atomic_write_text, jsonl_line

    class TrainLogCallback(TrainerCallback):
        def __init__(self):
            self.path = Path(path)
            self._clock = time.perf_counter()
            self._tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self._clock, self._tokens = time.perf_counter(), state.num_input_tokens_seen
            self._write(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            entry = state.log_history[-1] if state.log_history else None
            if entry is not None and "loss" in entry:
                now = time.perf_counter()
                seconds, tokens = now - self._clock, state.num_input_tokens_seen - self._tokens
                entry["seconds"] = round(seconds, 4)
                entry["tokens"] = tokens
                entry["tokens_per_second"] = round(tokens / seconds, 2) if seconds > 0 else None
                self._clock, self._tokens = now, state.num_input_tokens_seen
            self._write(state)

        def _write(self, state) -> None:
            if state.is_world_process_zero:
                atomic_write_text(self.path, "".join(jsonl_line(e) for e in state.log_history if "loss" in e))

    return TrainLogCallback()


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the summary (as written), the trained model and its tokenizer."""

    summary: dict[str, Any]
    model: Any = None
    tokenizer: Any = None
    out: Path | None = None
    trainer: Any = field(default=None, repr=False)


def _loss_curve(history: list[dict]) -> dict[str, Any]:
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    if not losses:
        return {}
    tail = max(1, len(losses) // 10)
    marks = sorted({min(len(losses) - 1, round(i * (len(losses) - 1) / 10)) for i in range(11)})
    return {"first": losses[0][1], "last": losses[-1][1],
            "mean_last_10pct": round(sum(l for _, l in losses[-tail:]) / tail, 6),
            "min": min(l for _, l in losses), "by_decile": [[losses[i][0], losses[i][1]] for i in marks]}


def _throughput(history: list[dict]) -> float | None:
    """Real input tokens per second over the logged steps (a resumed run's earlier steps included)."""
    timed = [e for e in history if e.get("seconds") and "tokens" in e]
    seconds = sum(e["seconds"] for e in timed)
    return round(sum(e["tokens"] for e in timed) / seconds, 2) if seconds else None


def training_device():
    """The device a run trains on: what the Trainer will pick (CUDA unless absent or ``--cpu``)."""
    import torch

    from .models import resolve_device

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cpu") if use_cpu else resolve_device("auto")


def training_arguments(config: dict, out: Path, precision: Precision, world_size: int, device=None,
                       show_progress: bool = True):
    """``transformers.TrainingArguments`` for the ``ft`` section (checkpoints under ``out/checkpoints``).

    ``use_cpu`` is set whenever training runs on CPU: only then does accelerate treat several
    processes started by ``accelerate launch`` (torchrun) as one gloo job (MULTI_CPU) instead of
    independent single-process runs.
    """
    from transformers import TrainingArguments

    ft = config["ft"]
    device = device if device is not None else training_device()
    kwargs: dict[str, Any] = dict(
        output_dir=str(out / CHECKPOINT_DIR),
        use_cpu=device.type == "cpu",
        per_device_train_batch_size=ft["per_device_batch_size"],
        gradient_accumulation_steps=gradient_accumulation(config, world_size),
        learning_rate=ft["learning_rate"],
        lr_scheduler_type=ft["lr_scheduler"],
        warmup_steps=ft["warmup_steps"],
        weight_decay=ft["weight_decay"],
        max_grad_norm=ft["max_grad_norm"],
        optim=ft["optimizer"],
        num_train_epochs=ft["epochs"] if ft["max_steps"] == 0 else 1.0,
        max_steps=ft["max_steps"] if ft["max_steps"] > 0 else -1,
        bf16=precision.bf16,
        fp16=precision.fp16,
        activation_checkpointing=ft["gradient_checkpointing"],  # transformers 5's name for gradient checkpointing
        # non-reentrant checkpointing needs no input that requires grad (frozen embeddings under LoRA)
        activation_checkpointing_kwargs={"use_reentrant": False} if ft["gradient_checkpointing"] else None,
        logging_strategy="steps",
        logging_steps=ft["logging_steps"],
        save_strategy="steps" if ft["save_steps"] > 0 else "no",
        save_steps=ft["save_steps"] if ft["save_steps"] > 0 else 500,
        save_total_limit=1,  # resuming needs only the newest checkpoint
        seed=ft["train_seed"],
        data_seed=ft["train_seed"],
        # padding-free batches carry no padding: count every input token; padded ones: the attention mask
        include_num_input_tokens_seen="all" if ft["batching"] == "padding_free" else "non_padding",
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=not show_progress,
        ddp_find_unused_parameters=False,
    )
    try:
        return TrainingArguments(**kwargs)
    except ValueError as error:  # e.g. an unknown optimizer name, bf16 on hardware without it
        raise ConfigError(f"ft: {error}") from error


def finetune(config: dict, out: str | Path | None = None, data_dir: str | Path = "data", *, overwrite: bool = False,
             callbacks: Iterable[Any] = (), show_progress: bool = True) -> FinetuneResult:
    """Fine-tune ``config['model']`` on ``config['ft']`` and write the output folder ``out``.

    ``config`` is a resolved config (:func:`iclvsft.config.load_config`) whose ``ft.tasks`` names at
    least one task. Resumes an unfinished run in ``out``; refuses a finished one unless ``overwrite``.
    ``callbacks`` are extra ``TrainerCallback`` objects (tests use one to interrupt a run).
    Returns a :class:`FinetuneResult` (on every process; only the main one writes files).
    """
    started = time.perf_counter()
    from transformers import Trainer

    from .io import provenance, write_json

    ft = config["ft"]
    if not ft["tasks"]:
        raise ConfigError("no task to fine-tune on: pass --task (or set ft.tasks in the config)")
    out = Path(out) if out is not None else default_out_dir(config)
    rows, data_record = select_rows(data_dir, ft["tasks"], ft["n_train"], ft["train_seed"],
                                    config["data"]["task_params"])
    identity = run_identity(config, data_record)
    action = inspect_output(out, identity, overwrite)

    device = training_device()
    precision = plan_precision(config, device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gradient_accumulation(config, world_size)  # fail before loading anything
    args = training_arguments(config, out, precision, world_size, device, show_progress=show_progress)
    if args.world_size != world_size:
        raise ConfigError(f"the launcher started {world_size} processes but the Trainer sees {args.world_size}; "
                          f"use `accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N`")
    distributed = args.distributed_state.distributed_type if args.distributed_state is not None else None
    sharded = str(distributed).split(".")[-1] in ("DEEPSPEED", "FSDP")
    is_main = args.process_index == 0

    with args.main_process_first(local=False, desc="preparing the output folder"):
        if is_main:
            if action == "clear":
                logger.info("--overwrite: removing the previous run in %s", out)
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            if action != "resume":
                write_json(out / RUN_CONFIG_FILE, {"identity": identity, "config": config,
                                                   "data_dir": str(data_dir), "out": str(out)})
    resume = last_checkpoint(out) if action == "resume" else None
    if resume:
        logger.info("resuming %s from %s", out, resume)

    model, tokenizer, model_info = build_model(config, precision, args.device, sharded=sharded)
    features, token_stats = tokenize_rows(rows, tokenizer, loss_on=ft["loss_on"], max_length=ft["max_length"],
                                          append_eos=ft["append_eos"])
    collator = make_collator(ft["batching"], tokenizer.pad_token_id, ft["max_length"],
                             model_info["attn_implementation"])
    with warnings.catch_warnings():
        # peft looks the base model up on the hub to see whether the vocabulary was resized; offline
        # names are not hub ids, so the lookup fails and warns at every checkpoint. Harmless: we never resize.
        warnings.filterwarnings("ignore", message=r"(Unable to fetch remote file|Could not find a config file)")
        trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator,
                          processing_class=tokenizer, callbacks=[make_log_callback(out / LOG_FILE), *callbacks])
        if not show_progress:  # without a progress bar the Trainer prints every log dict; train_log.jsonl has them
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        logger.info("fine-tuning %s (%s, %s) on %d rows of %s: %s tokens, batch %d = %d x %d devices x %d steps",
                    config["model"], ft["method"], precision.dtype, len(features), ",".join(ft["tasks"]),
                    f"{token_stats['tokens']:,}", ft["batch_size"], ft["per_device_batch_size"], world_size,
                    args.gradient_accumulation_steps)
        train_started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - train_started

        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        base_config = getattr(unwrapped, "config", None)
        if base_config is not None:
            base_config.use_cache = True  # the saved model generates with a KV cache
        trainer.save_model(str(out))
    state = trainer.state
    summary = {
        "status": "finished",
        "model": config["model"],
        "method": ft["method"],
        "tasks": list(ft["tasks"]),
        "n_train": ft["n_train"],
        "loss_on": ft["loss_on"],
        "batching": ft["batching"],
        "precision": vars(precision),
        "model_info": model_info,
        "data": data_record,
        "tokens_per_epoch": token_stats,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "effective_batch_size": ft["per_device_batch_size"] * args.gradient_accumulation_steps * args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "device": str(args.device),
        "final_loss": next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None),
        "train_loss": output.training_loss,
        "loss_curve": _loss_curve(state.log_history),
        "input_tokens": state.num_input_tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": _throughput(state.log_history),
        "resumed_from": resume,
        "provenance": provenance(),
    }
    if is_main:
        if not ft["keep_checkpoints"]:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        write_json(out / SUMMARY_FILE, summary)  # last: its presence marks the run finished
        logger.info("finished: %d steps, final loss %s, %.0f s; wrote %s", summary["steps"], summary["final_loss"],
                    summary["wall_seconds"], out)
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(summary=summary, model=unwrapped, tokenizer=tokenizer, out=out, trainer=trainer)
