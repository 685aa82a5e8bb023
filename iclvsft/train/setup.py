"""Fine-tuning set-up: precision, the model to train (LoRA or full), the Trainer's arguments and the
callback that keeps train_log.jsonl."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import ProgressCallback, TrainerCallback, TrainingArguments, set_seed

from ..config import Config
from ..errors import ConfigError
from ..io import atomic_write_text, jsonl_line, progress
from ..models import count_parameters, load_model, resolve_attn_implementation, resolve_device, resolve_dtype
from ..models.loading import quiet_peft_deprecation
from ..reporting import report_to_list

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# Attention implementations that honour position-id packing (block-diagonal mask / varlen kernels).
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def gradient_accumulation(config: Config, world_size: int) -> int:
    """Accumulation steps so that per-device batch x devices x steps == ``ft.batch_size``."""
    ft = config.ft
    per_step = ft.per_device_batch_size * world_size
    if ft.batch_size % per_step:
        raise ConfigError(f"ft.batch_size {ft.batch_size} is not a multiple of ft.per_device_batch_size "
                          f"{ft.per_device_batch_size} x {world_size} processes; change one of them")
    return ft.batch_size // per_step


@dataclass
class Precision:
    """How a run uses its dtype: the parameters' load dtype and the autocast flag for the Trainer."""

    dtype: str  # the resolved training precision: float32 | bfloat16 | float16
    load_dtype: str  # what the weights are loaded in (full FT: fp32 master weights under autocast)
    bf16: bool
    fp16: bool


def plan_precision(config: Config, device) -> Precision:
    """Resolve ``config.dtype`` for ``device`` (see :func:`iclvsft.models.resolve_dtype`) and ``ft.method``."""
    dtype = resolve_dtype(config.dtype, device, name=config.model)
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return Precision(name, "float32", bf16=False, fp16=False)
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        raise ConfigError("dtype fp16 trains only on CUDA (it needs a gradient scaler); use bf16 or fp32 here")
    # LoRA: the frozen base may live in half precision (the adapter is fp32, peft's default).
    # Full: fp32 master weights; the half-precision math comes from autocast. ft.param_dtype=bf16 (full
    # FT only, checked with the config): bf16 weights and gradients, updated by an optimizer that rounds
    # stochastically (iclvsft.optimizers.STOCHASTIC_ROUNDING).
    if config.ft.method == "full" and config.ft.param_dtype == "bf16":
        if dtype != torch.bfloat16:
            raise ConfigError(f"ft.param_dtype=bf16 trains in bf16, but dtype {config.dtype} resolves to {name} on "
                              f"{torch.device(device).type}; use ft.param_dtype=fp32 there")
        return Precision(name, "bfloat16", bf16=True, fp16=False)
    load = name if config.ft.method == "lora" else "float32"
    return Precision(name, load, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


@dataclass(frozen=True)
class ModelPlan:
    """How :func:`build_model` loads a model for training, decided before anything is loaded (a pure
    function of the config, the precision, the device and the launcher: :func:`plan_model`)."""

    load_dtype: str  # what load_model loads the weights in
    cast_to: str | None  # the dtype the loaded model is cast to; None: leave it (DeepSpeed manages it)
    autocast: str | None  # the dtype the Trainer's autocast computes in (bf16 / fp16), None without autocast
    attn: str | None  # the attention the model trains with; None: transformers' default (SDPA, or eager)
    attn_at_load: str  # the attn_implementation passed to load_model
    switch_attn: bool  # set_attn_implementation(attn) once the weights are loaded
    note: str = ""  # one line for the log when the choice needs explaining


def plan_model(config: Config, precision: Precision, device, sharded: bool = False,
               deepspeed_zero3: bool = False) -> ModelPlan:
    """Load dtype, attention and autocast of a training run; nothing is loaded.

    The attention is decided from the dtype the attention kernel **computes** in, after the weights'
    dtype is known: full FT keeps fp32 master weights and runs under bf16 (or fp16) autocast, where
    q/k/v reach the kernel in half precision (transformers' flash-attention integration casts fp32
    q/k/v to the autocast dtype: ``integrations.flash_attention.get_target_dtype``), so
    FlashAttention-2 is valid there. load_model checks attention against the **load** dtype (for
    inference, where no autocast runs), so such a run loads with the default kernel and switches to
    FlashAttention-2 once loaded (``set_attn_implementation``), as runs loaded on the CPU already did.

    ``deepspeed_zero3``: DeepSpeed's bf16/fp16 engine holds the module in half precision and the fp32
    master copy in its optimizer partitions, so the weights load in the training dtype and are not
    cast (a ``.to()`` on ZeRO-3-partitioned parameters would only touch their empty placeholders).
    """
    device = torch.device(device)
    compute = getattr(torch, precision.dtype)
    autocast = precision.dtype if (precision.bf16 or precision.fp16) else None
    if deepspeed_zero3:
        load, cast_to = precision.dtype, None
    else:
        load, cast_to = precision.load_dtype, precision.load_dtype
    autocast_dtype = getattr(torch, autocast) if autocast and not deepspeed_zero3 else None
    attn = resolve_attn_implementation(config.attn_implementation, device, getattr(torch, load),
                                       autocast_dtype=autocast_dtype)
    load_device = "cpu" if sharded or device.type != "cuda" else "cuda"
    # load_model accepts flash_attention_2 only for a CUDA load in half precision (inference rules)
    switch = attn == "flash_attention_2" and (load_device == "cpu" or getattr(torch, load) != compute)
    note = ""
    if switch and getattr(torch, load) == torch.float32:
        note = (f"attention: flash_attention_2 under {autocast} autocast over fp32 master weights (transformers "
                f"casts q/k/v to {autocast} for the kernel); loaded with the default kernel, switched after loading")
    return ModelPlan(load_dtype=load, cast_to=cast_to, autocast=autocast if not deepspeed_zero3 else None,
                     attn=attn, attn_at_load="auto" if switch or attn is None else attn, switch_attn=switch,
                     note=note)


def _deepspeed_zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return bool(is_deepspeed_zero3_enabled())


def build_model(config: Config, precision: Precision, device, sharded: bool = False, show_progress: bool = True):
    """Load the model for training: LoRA-wrapped (peft) or all parameters trainable.

    ``device``: where training runs. Sharded runs (FSDP, DeepSpeed ZeRO-3) load on CPU and let the
    Trainer place the shards. Load dtype and attention come from :func:`plan_model`: FlashAttention-2
    is switched on after loading when the weights are loaded on CPU or in fp32 (load_model accepts it
    only for a CUDA load in half precision).
    """
    ft = config.ft
    device = torch.device(device)
    plan = plan_model(config, precision, device, sharded=sharded, deepspeed_zero3=sharded and _deepspeed_zero3())
    load_device = "cpu" if sharded or device.type != "cuda" else str(device)
    loaded = load_model(config.model, dtype=plan.load_dtype, device=load_device,
                        attn_implementation=plan.attn_at_load, show_progress=show_progress)
    model = loaded.model
    if plan.switch_attn:
        model.set_attn_implementation(plan.attn)
    if plan.note:
        logger.info(plan.note)
    if plan.cast_to is not None and model.dtype != getattr(torch, plan.cast_to):
        model = model.to(getattr(torch, plan.cast_to))
    model.config.use_cache = False
    attn_used = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if ft.batching == "padding_free" and attn_used not in PACKING_SAFE_ATTENTION:
        raise ConfigError(f"ft.batching=padding_free needs an attention kernel that honours position-id packing "
                          f"({', '.join(PACKING_SAFE_ATTENTION)}); the model uses {attn_used!r}: set ft.batching=padded")
    set_seed(ft.train_seed)  # LoRA initialisation
    if ft.method == "lora":
        lora = ft.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
        try:
            with quiet_peft_deprecation():
                model = get_peft_model(model, peft_config)
        except ValueError as error:  # e.g. a target module name the model does not have
            raise ConfigError(f"ft.lora: {error}") from error
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    info = dict(loaded.info, attn_implementation=attn_used, load_dtype=plan.load_dtype, autocast=plan.autocast,
                trainable_params=count_parameters(model, trainable_only=True), total_params=count_parameters(model))
    return model, loaded.tokenizer, info


def training_device():
    """The device a run trains on: what the Trainer will pick (CUDA unless absent or ``--cpu``)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cpu") if use_cpu else resolve_device("auto")


def training_arguments(config: Config, out: Path, precision: Precision, world_size: int, device=None,
                       show_progress: bool = True):
    """``transformers.TrainingArguments`` for the ``ft`` section (checkpoints under ``out/checkpoints``).

    ``use_cpu`` is set whenever training runs on CPU: only then does accelerate treat several
    processes started by ``accelerate launch`` (torchrun) as one gloo job (MULTI_CPU) instead of
    independent single-process runs.
    """
    ft = config.ft
    device = device if device is not None else training_device()
    kwargs: dict[str, Any] = dict(
        output_dir=str(out / CHECKPOINT_DIR),
        use_cpu=device.type == "cpu",
        per_device_train_batch_size=ft.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(config, world_size),
        learning_rate=ft.learning_rate,
        lr_scheduler_type=ft.lr_scheduler,
        warmup_steps=ft.warmup_steps,
        weight_decay=ft.weight_decay,
        max_grad_norm=ft.max_grad_norm,
        optim=ft.optimizer,
        # bf16 weights: torchao's low-bit AdamW rounds each update to bf16 stochastically
        optim_args="bf16_stochastic_round=True" if precision.load_dtype == "bfloat16" and ft.method == "full" else None,
        num_train_epochs=ft.epochs if ft.max_steps == 0 else 1.0,
        max_steps=ft.max_steps if ft.max_steps > 0 else -1,
        bf16=precision.bf16,
        fp16=precision.fp16,
        activation_checkpointing=ft.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        # non-reentrant checkpointing needs no input that requires grad (frozen embeddings under LoRA)
        activation_checkpointing_kwargs={"use_reentrant": False} if ft.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=ft.logging_steps,
        save_strategy="steps" if ft.save_steps > 0 else "no",
        save_steps=ft.save_steps if ft.save_steps > 0 else 500,
        save_total_limit=1,  # resuming needs only the newest checkpoint
        seed=ft.train_seed,
        data_seed=ft.train_seed,
        # padding-free batches carry no padding: count every input token; padded ones: the attention mask
        include_num_input_tokens_seen="all" if ft.batching == "padding_free" else "non_padding",
        report_to=report_to_list(ft.report_to) or "none",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=not show_progress,
        ddp_find_unused_parameters=False,
    )
    try:
        return TrainingArguments(**kwargs)
    except ValueError as error:  # e.g. an unknown optimizer name, bf16 on hardware without it
        raise ConfigError(f"ft: {error}") from error


class LossProgressCallback(ProgressCallback):
    """transformers' progress bar, with the latest loss on the bar instead of a printed dict per logged
    step (those go to train_log.jsonl): a study's log stays one line per stage. The bar is
    :func:`iclvsft.io.progress`: outside a terminal, plain lines at most every 30 s, no carriage returns."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = progress(total=state.max_steps, desc="fine-tuning", unit="step", dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)


class TrainLogCallback(TrainerCallback):
    """Adds seconds and tokens/s to each logged step and keeps ``path`` (``train_log.jsonl``) equal
    to the log history.

    The file is rewritten (atomically) from ``state.log_history`` at every log, so after a resume it
    holds exactly the steps up to the checkpoint plus the new ones: no stale or duplicated lines.
    Only the world's main process writes. Tokens are real (non-padding) input tokens, summed over
    devices.
    """

    def __init__(self, path: str | Path):
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


@contextlib.contextmanager
def training_attention(attn_implementation: str | None, device: torch.device | str):
    """PyTorch SDPA without its cuDNN backend while training on CUDA (a no-op elsewhere).

    Padding-free batches reach SDPA with the packed rows' block mask and a new length every step; the
    cuDNN backend plans a graph per call and per new shape (on an H200: ~3 ms of host time per
    attention call and a 1-2 s stall at each new length, the GPU's own work unchanged). Without it the
    memory-efficient kernel takes the mask: full FT of the 0.5B shape went from 12.9k to 27.9k tokens/s
    (benchmarks/README.md, "GPU throughput"). Flash and math stay allowed; FlashAttention-2 (its own
    ``attn_implementation``) is not SDPA and is untouched."""
    if attn_implementation != "sdpa" or torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
