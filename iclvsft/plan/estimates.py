"""Memory and time estimates of one run: the constants (each stated, with where it comes from), the
formulas of peak memory and of time, and the numbers of one fine-tuning run they depend on
(:class:`FTShape`). See :mod:`iclvsft.plan` for the formulas in words."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import Config, FtConfig
from .machine import Machine
from .shapes import GIB, Shape

# ----------------------------------------------------------------------------------------------------
# constants (each one stated, with where it comes from)
# ----------------------------------------------------------------------------------------------------

#: Bytes per (position with logits x vocabulary entry) at the peak: the bf16 logits kept in the
#: model's output 2, the fp32 log-softmax saved by cross-entropy 4, its gradient 4, the logits' 2.
LOGIT_BYTES = 12.0
#: ZeRO-3 keeps at most this many gathered parameters alive (DeepSpeed's stage3_max_live_parameters).
ZERO3_LIVE_PARAMS = 1e9
#: ZeRO-3 steps its optimizer in sub-groups of this many parameters (DeepSpeed's sub_group_size).
ZERO3_SUB_GROUP = 1e9
CUDA_OVERHEAD = 1.0 * GIB  # CUDA context, cuBLAS/NCCL workspaces: outside torch's allocator peak
CPU_OVERHEAD = 2.0 * GIB  # the interpreter, torch, tokenizer and data of the process
FIT_FRACTION = 0.9  # headroom for allocator fragmentation

#: Optimizer state bytes per trainable parameter (transformers' ``optim`` names). torchao's low-bit
#: AdamW (adamw_torch_8bit / _4bit) keeps each of its two moments as 8-bit (4-bit) codes plus one fp32
#: scale per block of 256 values (transformers' block_size): 2 x (1 + 4/256), 2 x (0.5 + 4/256).
OPTIMIZER_STATE = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_torch_npu_fused": 8, "adamw_apex_fused": 8,
                   "adamw_anyprecision": 8, "adafactor": 1, "sgd": 0, "adagrad": 4, "lion_32bit": 4, "lion_8bit": 1,
                   "adamw_8bit": 2, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "rmsprop": 4,
                   "adamw_torch_8bit": 2 * (1 + 4 / 256), "adamw_torch_4bit": 2 * (0.5 + 4 / 256)}
#: torchao's AdamW updates one parameter at a time (a compiled kernel per shape) through temporaries of
#: that parameter's size, counted per value of the largest trained tensor. 8-bit: two fp32 temporaries,
#: 8 bytes (measured: 8.03 bytes per value for a 32M-value tensor, fp32 and bf16 weights alike, torchao
#: 0.18 on CPU). 4-bit: 24 bytes, fitted to the one measurement there is (full FT of the offline 0.5B
#: model, benchmarks/bench_lowmem.py: peak RSS 8.00 GiB while training, 2.03 GiB above what 8 bytes
#: gives; where the extra bytes go inside torchao was not traced) and checked against it in tests/test_plan.py.
PER_TENSOR_TEMP = {"adamw_torch_8bit": 8, "adamw_torch_4bit": 24}

#: Tokens per item of each task (Qwen2.5 tokenizer, default generators, 64 train / 64 test items):
#: (FT row mean, FT row max, completion + eos, demonstration mean, query mean, query max).
TASK_TOKENS = {
    "expression": (31, 36, 4, 23, 22, 29),
    "code": (75, 86, 5, 67, 67, 89),
    "boolean": (30, 33, 3, 24, 23, 26),
    "relation": (52, 74, 3, 39, 44, 60),
    "parity": (74, 94, 3, 59, 56, 78),
    "algebra": (61, 65, 11, 49, 39, 43),
}
DEFAULT_TOKENS = (96, 160, 12, 80, 80, 128)  # a task not in the table: generous
HEADER_TOKENS = 16  # a task's header line
CHAT_TOKENS = 30  # prompt_style chat: the chat template around the prompt


@dataclass(frozen=True)
class Rates:
    """Throughput used for time estimates (see the module docstring)."""

    label: str
    train_flops: float  # model FLOP/s of a training pass (6 Pm per token full, 4 Pm LoRA)
    pass_seconds: float  # fixed cost per forward/backward pass (launches, casts, optimizer; per 0.5B on CPU)
    prefill_flops: float  # FLOP/s of a batched prefill (2 Pm per token)
    bandwidth: float  # bytes/s: each greedy decoding step reads every weight once
    decode_seconds: float  # fixed cost per decoding step
    load_bytes: float  # bytes/s to load weights
    fp32_slowdown: float = 1.0  # fp32 compute instead of bf16


#: Measured here (2-core AVX512-BF16 CPU, benchmarks/README.md): training ~380 model GFLOP/s for full
#: and LoRA (bench_train.py, batch 16); batched prefill ~600 GFLOP/s and ~0.1 s per decoding step of
#: the 0.5B model (the CPU study's ICL stage: 2,750 items in 5.8 min); fp32 matmuls 4x slower.
CPU_RATES = Rates("measured rates of the project's 2-core CPU", train_flops=380e9, pass_seconds=0.6,
                  prefill_flops=600e9, bandwidth=12e9, decode_seconds=0.0, load_bytes=1e9, fp32_slowdown=4.0)
#: Rough, H100/H200-class: 146 TFLOP/s + 0.12 s per pass fits bench_memory.py's H200 step times
#: (0.5B-7B, 512 tokens, 0.11-0.23 s); decoding 30 ms per step + weights / 2.5 TB/s.
GPU_RATES = Rates("rough GPU rates (H100/H200-class, fit to bench_memory.py's H200 step times)",
                  train_flops=146e12, pass_seconds=0.12, prefill_flops=150e12, bandwidth=2.5e12,
                  decode_seconds=0.03, load_bytes=2e9, fp32_slowdown=8.0)
ZERO3_LINK_BYTES = 100e9  # bytes/s per GPU for ZeRO-3's gathers and reduce-scatters (NVLink-class)
OFFLOAD_PARAMS_PER_S = 1e9  # DeepSpeed CPU Adam, parameters updated per second on a node's cores
PCIE_BYTES = 20e9  # host <-> GPU copies with CPU offload


# ----------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    device: float  # peak bytes on each device (a GPU; host RAM for a CPU run)
    host: float = 0.0  # host RAM needed besides (ZeRO-3 CPU offload), for the whole node
    parts: dict[str, float] = field(default_factory=dict)


def optimizer_state_bytes(optimizer: str) -> float:
    return float(OPTIMIZER_STATE.get(optimizer, 8))


def param_bytes(ft: FtConfig) -> int:
    """Bytes per trained weight and per gradient of full FT: 4 (fp32 master weights), 2 (ft.param_dtype=bf16)."""
    return 2 if ft.method == "full" and ft.param_dtype == "bf16" else 4


def train_memory(shape: Shape, method: str, *, tokens: float, logit_positions: float, lora_r: int = 16,
                 half: bool = True, optimizer: str = "adamw_torch_fused", accumulation: int = 1,
                 checkpointing: bool = False, strategy: str = "single", n_gpus: int = 1,
                 cuda: bool = True, param_bytes: int = 4) -> Estimate:
    """Peak memory of one training run (see the module docstring for the formula).

    ``tokens``: tokens of one forward pass on one device; ``logit_positions``: positions whose logits
    are computed in it; ``half``: bf16/fp16 compute (autocast for full FT, a half-precision base for
    LoRA); ``strategy``: ``single`` | ``zero3`` | ``zero3_offload`` (DeepSpeed, ``n_gpus`` processes);
    ``param_bytes``: full FT's bytes per weight and per gradient (4: fp32 master weights under
    autocast, 2: ``ft.param_dtype=bf16``, no autocast copies then).
    """
    lora = method == "lora"
    p = float(shape.params)
    t = float(shape.lora_params(lora_r)) if lora else p
    state = optimizer_state_bytes(optimizer) * t
    acts = shape.activation_bytes(tokens, lora=lora, half=half or strategy != "single", checkpointing=checkpointing)
    logits = logit_positions * shape.vocab * LOGIT_BYTES
    if strategy == "single":
        if lora:
            weights, copies = (2.0 if half else 4.0) * p + 4 * t, (2 * t if half else 0.0)
        else:
            weights, copies = param_bytes * p, (2.0 * shape.matmul_params if half and param_bytes == 4 else 0.0)
        grads = (4 if lora else param_bytes) * t
        foreach = optimizer in ("adamw_torch", "adamw_torch_xla") and cuda
        temp = 4 * t if foreach else PER_TENSOR_TEMP.get(optimizer, 0) * (shape.largest_lora_tensor(lora_r) if lora
                                                                          else shape.largest_tensor)
        forward = copies + acts + logits + (grads if accumulation > 1 else 0.0)
        step = grads + temp
        parts = {"weights": weights, "optimizer": state, "gradients": grads, "autocast_copies": copies,
                 "activations": acts, "logits": logits, "optimizer_temp": temp}
        return Estimate(weights + state + max(forward, step), 0.0, parts)
    if strategy not in ("zero3", "zero3_offload"):
        raise ValueError(f"unknown strategy {strategy!r}")
    n = max(int(n_gpus), 1)
    frozen = p - t if lora else 0.0
    working = 2 * min(p, ZERO3_LIVE_PARAMS)  # gathered bf16 parameters (layers in flight, prefetch)
    if strategy == "zero3":
        shard = (2 * frozen + (2 + 2 + 4) * t + state) / n  # bf16 weights + bf16 grads + fp32 master + state
        temp = 4 * min(t / n, ZERO3_SUB_GROUP)  # one optimizer sub-group's fp32 gradients
        parts = {"shards": shard, "working_set": working, "optimizer_temp": temp, "activations": acts,
                 "logits": logits}
        return Estimate(shard + working + temp + acts + logits, 0.0, parts)
    shard = (2 * (frozen + t) + 2 * t) / n  # bf16 weights + bf16 gradient partitions stay on the GPU
    host = (4 + 4) * t + state  # fp32 master weights, fp32 gradients and optimizer state: host RAM
    parts = {"shards": shard, "working_set": working, "activations": acts, "logits": logits, "host": host}
    return Estimate(shard + working + acts + logits, host, parts)


def eval_memory(shape: Shape, *, weight_bytes: int, batch: int, context: float, query: float,
                adapter_params: float = 0.0) -> Estimate:
    """Peak memory of greedy evaluation: weights, the KV cache of ``batch`` rows of ``context`` tokens
    (the shared prefix is copied to every row), one layer's prefill of ``query`` tokens per row
    (hidden states, q/k/v, MLP, attention scores against the context) and the last position's logits."""
    weights = shape.params * weight_bytes + 4 * adapter_params
    kv = batch * context * shape.kv_bytes_per_token(weight_bytes)
    prefill = batch * query * (6 * shape.hidden + 3 * shape.intermediate) * weight_bytes
    scores = batch * shape.heads * query * context * 4
    logits = batch * shape.vocab * 4 * 2
    parts = {"weights": weights, "kv_cache": kv, "prefill": prefill + scores, "logits": logits}
    return Estimate(weights + kv + prefill + scores + logits, 0.0, parts)


def needed(estimate: Estimate, cuda: bool) -> float:
    """Bytes a run needs on its device: the estimate plus the process's overhead."""
    return estimate.device + (CUDA_OVERHEAD if cuda else CPU_OVERHEAD)


def fits(estimate: Estimate, machine: Machine) -> bool:
    if machine.cuda:
        device_ok = needed(estimate, True) <= FIT_FRACTION * machine.gpu_bytes
        host_ok = estimate.host == 0 or estimate.host + CPU_OVERHEAD <= FIT_FRACTION * machine.host_bytes
        return device_ok and host_ok
    return needed(estimate, False) <= FIT_FRACTION * machine.host_bytes


# ----------------------------------------------------------------------------------------------------
# what a config implies: tokens, precision
# ----------------------------------------------------------------------------------------------------

def task_tokens(task: str) -> tuple[int, int, int, int, int, int]:
    return TASK_TOKENS.get(task, DEFAULT_TOKENS)


def compute_dtype(config: Config, model: str, cuda: bool) -> str:
    """bf16 | fp16 | fp32: the dtype runs of ``model`` compute in on this (stated) machine."""
    import torch

    from ..models.offline import OFFLINE_MODELS
    from ..models.precision import resolve_dtype
    from ..models.tiny import is_tiny_model

    dtype = config.dtype
    if cuda and str(dtype).lower() == "auto":
        tiny = model not in OFFLINE_MODELS and is_tiny_model(model)
        resolved = torch.float32 if tiny else torch.bfloat16  # bf16 on every GPU this plans for (Ampere+)
    else:
        resolved = resolve_dtype(dtype, "cpu", name=model)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolved, "fp32")


@dataclass(frozen=True)
class FTShape:
    """The numbers of one fine-tuning run that memory and time depend on."""

    rows: int
    steps: int
    tokens_per_pass: float  # the largest pass (memory)
    mean_tokens_per_pass: float  # time
    logit_positions: float


def ft_shape(ft: FtConfig, config: Config, processes: int = 1) -> FTShape:
    tasks = list(ft.tasks) or list(config.data.tasks)
    rows = ft.n_train * len(tasks)
    steps = ft.max_steps if ft.max_steps > 0 else math.ceil(rows * ft.epochs / ft.batch_size)
    extra = CHAT_TOKENS if config.prompt_style == "chat" else 0
    means = [task_tokens(t)[0] + extra for t in tasks]
    maxes = [min(task_tokens(t)[1] + extra, ft.max_length) for t in tasks]
    answers = [task_tokens(t)[2] for t in tasks]
    pd = ft.per_device_batch_size
    if ft.batching == "max_length":
        longest, mean = ft.max_length, ft.max_length
    elif ft.batching == "padded":
        longest, mean = max(maxes), max(maxes)
    else:  # padding-free: the rows' own tokens
        longest, mean = max(maxes), sum(means) / len(means)
    per_row_logits = longest if (ft.logits_on == "all" or ft.loss_on == "sequence") else max(answers)
    return FTShape(rows, steps, pd * longest, pd * mean, pd * per_row_logits)


def accumulation_for(ft: FtConfig, processes: int) -> int | None:
    per_step = ft.per_device_batch_size * processes
    return ft.batch_size // per_step if ft.batch_size % per_step == 0 else None


# ----------------------------------------------------------------------------------------------------
# time
# ----------------------------------------------------------------------------------------------------

def _rates(cuda: bool) -> Rates:
    return GPU_RATES if cuda else CPU_RATES


def train_seconds(shape: Shape, method: str, fts: FTShape, *, half: bool, cuda: bool, strategy: str = "single",
                  processes: int = 1, accumulation: int = 1, lora_r: int = 16) -> float:
    rates = _rates(cuda)
    flops_per_token = (4 if method == "lora" else 6) * shape.matmul_params
    rate = rates.train_flops / (1.0 if half else rates.fp32_slowdown)
    per_pass = rates.pass_seconds * (1.0 if cuda else max(shape.matmul_params / 0.5e9, 0.05))
    per_pass += fts.mean_tokens_per_pass * flops_per_token / rate
    trainable = shape.lora_params(lora_r) if method == "lora" else shape.params
    if strategy in ("zero3", "zero3_offload") and processes > 1:
        per_pass += (4 * shape.params + 2 * trainable) / ZERO3_LINK_BYTES * (processes - 1) / processes
    per_step = accumulation * per_pass
    if strategy == "zero3_offload":
        per_step += trainable / processes / OFFLOAD_PARAMS_PER_S + 4 * trainable / processes / PCIE_BYTES
    return fts.steps * per_step + load_seconds(shape, 4, cuda)


def load_seconds(shape: Shape, weight_bytes: int, cuda: bool) -> float:
    return 3.0 + shape.params * weight_bytes / _rates(cuda).load_bytes


def eval_seconds(shape: Shape, *, cells: list[tuple[int, int]], query: float, demo: float, new_tokens: int,
                 batch: int, weight_bytes: int, half: bool, cuda: bool, per_item: bool = False) -> float:
    """``cells``: (k demonstrations, items) per cell. Per cell: the shared prefix once (``per_item``:
    every item carries its own), each batch's prefill, and ``new_tokens`` greedy steps per batch."""
    rates = _rates(cuda)
    prefill = rates.prefill_flops / (1.0 if half else rates.fp32_slowdown)
    step = rates.decode_seconds + shape.params * weight_bytes / rates.bandwidth
    total = 0.0
    for k, items in cells:
        prefix = HEADER_TOKENS + k * demo
        tokens = items * (query + (prefix if per_item else 0.0)) + (0.0 if per_item else prefix)
        total += tokens * 2 * shape.matmul_params / prefill + math.ceil(items / batch) * new_tokens * step
    return total


