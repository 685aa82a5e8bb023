"""The plan step (``reproduce.py --plan``): every ICL cell and fine-tuning run a config implies, the
peak memory each one needs against the memory of this machine (or of a stated one), and the time it
takes, before any work; a run that cannot fit is named with what would fit.

Memory (bytes; P = parameters, T = trainable parameters, Pm = parameters used in matmuls, i.e. all
but an untied input embedding; per device):

* single device (what ``reproduce.py`` runs in-process, and what each ``ddp.yaml`` process holds)::

      static = weights + optimizer state                     weights: full 4P (fp32 master);
      peak   = static + max(forward, optimizer step)                  LoRA 2P (bf16 base) + 4T
      forward = autocast copies + activations + logits (+ gradients while accumulating)
      step    = gradients + optimizer temporaries

  gradients 4T (fp32); AdamW state 8T (two fp32 moments); ``adamw_torch`` (foreach, on CUDA) adds a
  temporary 4T at the step, the fused one none; full FT under bf16 autocast keeps a bf16 copy of every
  matmul weight for the backward pass (2Pm); activations = tokens per pass x layers x (a x hidden +
  b x intermediate) with (a, b) = :data:`ACT_FULL` or :data:`ACT_LORA` (bytes, measured by tensor
  accounting of what autograd saves; x2 without half-precision autocast); logits = positions whose
  logits are computed x vocab x :data:`LOGIT_BYTES`.
* DeepSpeed ZeRO-3 over n GPUs: 16T/n (bf16 weights and gradients, fp32 master and AdamW state, all
  partitioned) + the gathered working set + activations; with the optimizer offloaded to host memory
  the GPU keeps 2P/n + 2T/n and the node's host RAM holds (8 + optimizer)T.

A run fits when its estimate plus the process overhead (:data:`CUDA_OVERHEAD` / :data:`CPU_OVERHEAD`)
is at most :data:`FIT_FRACTION` of the memory. ``tests/test_plan.py`` checks the formula against the
tensors of real training steps on CPU and against the peaks measured on an H200
(``benchmarks/README.md``, "On a GPU"): within 25%.

Time: from rates measured on the project's 2-core CPU (``benchmarks/README.md``) and, for GPUs, a
rough H100/H200-class rate fit to ``bench_memory.py``'s step times: an estimate to plan by, not a
measurement.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

GIB = 2**30

# ----------------------------------------------------------------------------------------------------
# constants (each one stated, with where it comes from)
# ----------------------------------------------------------------------------------------------------

#: Saved activations per token and decoder layer, in bytes, as (a, b): a x hidden + b x intermediate.
#: Measured with torch.autograd.graph.saved_tensors_hooks on Qwen2.5-0.5B-shaped layers (hidden 896,
#: 14/2 heads, intermediate 1792 and 4864: two points fit a and b) under bf16 autocast, SDPA, one
#: forward pass, as the Trainer runs them; tests/test_plan.py measures them again on another shape.
ACT_FULL = (36.0, 8.0)  # full FT over fp32 weights: each matmul saves its own bf16 cast of its input
ACT_LORA = (43.0, 12.0)  # LoRA: bf16 base + the adapter branches (dropout masks, their inputs)
ACT_FP32_FACTOR = 2.0  # no half-precision compute: saved tensors are 4 bytes instead of 2 (an upper bound)
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

#: Optimizer state bytes per trainable parameter (transformers' ``optim`` names).
OPTIMIZER_STATE = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_torch_npu_fused": 8, "adamw_apex_fused": 8,
                   "adamw_anyprecision": 8, "adafactor": 1, "sgd": 0, "adagrad": 4, "lion_32bit": 4, "lion_8bit": 1,
                   "adamw_8bit": 2, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "rmsprop": 4}

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
# model shapes
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What memory and time depend on: a decoder-only transformer's dimensions."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama-style models do not
    source: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embedding = self.vocab * self.hidden
        return embedding * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters used in matrix products: all but an untied input embedding (a lookup)."""
        return self.params - (0 if self.tied else self.vocab * self.hidden)

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank ``r`` on every linear layer but the output head (all-linear)."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_dim, self.intermediate
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return self.layers * r * per_layer

    def activation_bytes(self, tokens: float, lora: bool, half: bool, checkpointing: bool = False) -> float:
        a, b = ACT_LORA if lora else ACT_FULL
        per_layer = (a * self.hidden + b * self.intermediate) * (1.0 if half else ACT_FP32_FACTOR)
        if checkpointing:  # each layer's input kept (fp32 residual), one layer's activations recomputed at a time
            return tokens * (self.layers * 4 * self.hidden + per_layer)
        return tokens * self.layers * per_layer

    def kv_bytes_per_token(self, nbytes: int) -> int:
        return 2 * self.layers * self.kv_dim * nbytes


def shape_from_config(cfg: dict, source: str = "") -> Shape:
    """A :class:`Shape` from a transformers ``config.json`` (as a dict)."""
    text = cfg.get("text_config") or cfg
    heads = int(text["num_attention_heads"])
    model_type = str(text.get("model_type", ""))
    return Shape(hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
                 intermediate=int(text["intermediate_size"]), heads=heads,
                 kv_heads=int(text.get("num_key_value_heads") or heads), vocab=int(text["vocab_size"]),
                 tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
                 head_dim=int(text.get("head_dim") or 0),
                 qkv_bias=model_type.startswith("qwen2") or bool(text.get("attention_bias", False)), source=source)


QWEN25 = "the public Qwen2.5 config"
#: The architectures of the public configs, for models not on this machine (no hub is contacted).
KNOWN_SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape(896, 24, 4864, 14, 2, 151936, True, source=QWEN25),
    "qwen2.5-1.5b": Shape(1536, 28, 8960, 12, 2, 151936, True, source=QWEN25),
    "qwen2.5-3b": Shape(2048, 36, 11008, 16, 2, 151936, True, source=QWEN25),
    "qwen2.5-7b": Shape(3584, 28, 18944, 28, 4, 152064, False, source=QWEN25),
    "qwen2.5-14b": Shape(5120, 48, 13824, 40, 8, 152064, False, source=QWEN25),
    "qwen2.5-32b": Shape(5120, 64, 27648, 40, 8, 152064, False, source=QWEN25),
    # the offline GGUF of Qwen2.5-Coder-0.5B-Instruct carries an untied output layer (~630M parameters)
    "qwen2.5-coder-0.5b-instruct": Shape(896, 24, 4864, 14, 2, 151936, False, source="the offline GGUF"),
    "smollm2-135m-instruct": Shape(576, 30, 1536, 9, 3, 49152, True, qkv_bias=False, source="the public config"),
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_shape(name: str) -> Shape | None:
    """The shape of model ``name`` without loading it: the tiny test model's config, an offline model's
    cached config.json, a local folder's config.json (an adapter folder: its base model's), the local
    hub cache's config.json, else :data:`KNOWN_SHAPES` by name; None when unknown."""
    from .models.offline import OFFLINE_MODELS, model_cache_root
    from .models.tiny import TINY_MODEL_NAME

    if name == TINY_MODEL_NAME:
        from .models.tiny import tiny_config

        return shape_from_config(tiny_config().to_dict(), "the tiny model's config")
    lower = name.lower()
    if name in OFFLINE_MODELS:
        cfg = _read_json(model_cache_root() / name / "config.json")
        if cfg:
            return shape_from_config(cfg, "the cached config.json")
        return KNOWN_SHAPES.get(lower) or _known_by_name(lower)
    folder = Path(name).expanduser()
    if folder.is_dir():
        cfg = _read_json(folder / "config.json")
        if cfg:
            return shape_from_config(cfg, f"{folder}/config.json")
        from .models.offline import adapter_base

        base = adapter_base(folder)
        return model_shape(base) if base and base != name else None
    try:  # the local hub cache only: never the network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub library refuses, or no cache
        cached = None
    if isinstance(cached, str):
        cfg = _read_json(Path(cached))
        if cfg:
            return shape_from_config(cfg, "the local hub cache")
    return KNOWN_SHAPES.get(lower) or _known_by_name(lower)


def _known_by_name(lower: str) -> Shape | None:
    match = re.search(r"qwen2\.5-(?:coder-|math-)?(\d+(?:\.\d+)?)b", lower)
    return KNOWN_SHAPES.get(f"qwen2.5-{match.group(1)}b") if match else None


# ----------------------------------------------------------------------------------------------------
# the machine
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    gpus: int  # 0: no GPU, runs use the CPU and host RAM
    gpu_bytes: float  # memory of each GPU
    host_bytes: float
    label: str

    @property
    def cuda(self) -> bool:
        return self.gpus > 0


def host_ram_bytes() -> float:
    """Total physical memory (``os.sysconf``): other processes' use is not subtracted."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return 0.0


def detect_machine(gpus: int | None = None, gpu_gib: float | None = None, host_gib: float | None = None) -> Machine:
    """This machine (CUDA devices and the free memory ``torch.cuda.mem_get_info`` reports, host RAM),
    with any of its numbers replaced by a stated one (``--plan-gpus``, ``--plan-gpu-gib``,
    ``--plan-host-gib``)."""
    import torch

    host = host_gib * GIB if host_gib is not None else host_ram_bytes()
    host_label = f"host RAM {host / GIB:.0f} GiB" + (" (stated)" if host_gib is not None else " (total, detected)")
    detected = torch.cuda.is_available()
    if gpus is None and gpu_gib is None:
        if not detected:
            return Machine(0, 0.0, host, f"no CUDA device: runs use the CPU and {host_label}")
        n = torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info(0)
        try:
            name = torch.cuda.get_device_name(0)
        except Exception:  # a faked or odd device
            name = "CUDA device"
        return Machine(n, float(free), host, f"{n} x {name}, {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB "
                                            f"(detected), {host_label}")
    n = 1 if gpus is None else int(gpus)
    if n < 0:
        raise ConfigError(f"--plan-gpus must be >= 0, got {n}")
    if n == 0:
        return Machine(0, 0.0, host, f"no GPU (stated): runs use the CPU and {host_label}")
    if gpu_gib is None:
        if not detected:
            raise ConfigError("--plan-gpus needs --plan-gpu-gib here: this machine has no CUDA device to read "
                              "the memory from (e.g. --plan-gpus 8 --plan-gpu-gib 80)")
        gpu_bytes, how = float(torch.cuda.mem_get_info(0)[0]), "free, detected"
    else:
        if gpu_gib <= 0:
            raise ConfigError(f"--plan-gpu-gib must be > 0, got {gpu_gib}")
        gpu_bytes, how = gpu_gib * GIB, "stated"
    return Machine(n, gpu_bytes, host, f"{n} x GPU with {gpu_bytes / GIB:.0f} GiB ({how}), {host_label}")


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


def train_memory(shape: Shape, method: str, *, tokens: float, logit_positions: float, lora_r: int = 16,
                 half: bool = True, optimizer: str = "adamw_torch_fused", accumulation: int = 1,
                 checkpointing: bool = False, strategy: str = "single", n_gpus: int = 1,
                 cuda: bool = True) -> Estimate:
    """Peak memory of one training run (see the module docstring for the formula).

    ``tokens``: tokens of one forward pass on one device; ``logit_positions``: positions whose logits
    are computed in it; ``half``: bf16/fp16 compute (autocast for full FT, a half-precision base for
    LoRA); ``strategy``: ``single`` | ``zero3`` | ``zero3_offload`` (DeepSpeed, ``n_gpus`` processes).
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
            weights, copies = 4 * p, (2.0 * shape.matmul_params if half else 0.0)
        grads = 4 * t
        foreach = "fused" not in optimizer and optimizer.startswith("adamw_torch") and cuda
        temp = 4 * t if foreach else 0.0
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


def compute_dtype(config: dict, model: str, cuda: bool) -> str:
    """bf16 | fp16 | fp32: the dtype runs of ``model`` compute in on this (stated) machine."""
    import torch

    from .models.offline import OFFLINE_MODELS
    from .models.precision import resolve_dtype
    from .models.tiny import is_tiny_model

    dtype = config["dtype"]
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


def ft_shape(ft: dict, config: dict, processes: int = 1) -> FTShape:
    tasks = list(ft["tasks"]) or list(config["data"]["tasks"])
    rows = ft["n_train"] * len(tasks)
    steps = ft["max_steps"] if ft["max_steps"] > 0 else math.ceil(rows * ft["epochs"] / ft["batch_size"])
    extra = CHAT_TOKENS if config["prompt_style"] == "chat" else 0
    means = [task_tokens(t)[0] + extra for t in tasks]
    maxes = [min(task_tokens(t)[1] + extra, ft["max_length"]) for t in tasks]
    answers = [task_tokens(t)[2] for t in tasks]
    pd = ft["per_device_batch_size"]
    if ft["batching"] == "max_length":
        longest, mean = ft["max_length"], ft["max_length"]
    elif ft["batching"] == "padded":
        longest, mean = max(maxes), max(maxes)
    else:  # padding-free: the rows' own tokens
        longest, mean = max(maxes), sum(means) / len(means)
    per_row_logits = longest if (ft["logits_on"] == "all" or ft["loss_on"] == "sequence") else max(answers)
    return FTShape(rows, steps, pd * longest, pd * mean, pd * per_row_logits)


def accumulation_for(ft: dict, processes: int) -> int | None:
    per_step = ft["per_device_batch_size"] * processes
    return ft["batch_size"] // per_step if ft["batch_size"] % per_step == 0 else None


# ----------------------------------------------------------------------------------------------------
# time
# ----------------------------------------------------------------------------------------------------

def _rates(cuda: bool) -> Rates:
    return GPU_RATES if cuda else CPU_RATES


def train_seconds(shape: Shape, method: str, fts: FTShape, *, half: bool, cuda: bool, strategy: str = "single",
                  processes: int = 1, accumulation: int = 1) -> float:
    rates = _rates(cuda)
    flops_per_token = (4 if method == "lora" else 6) * shape.matmul_params
    rate = rates.train_flops / (1.0 if half else rates.fp32_slowdown)
    per_pass = rates.pass_seconds * (1.0 if cuda else max(shape.matmul_params / 0.5e9, 0.05))
    per_pass += fts.mean_tokens_per_pass * flops_per_token / rate
    trainable = shape.lora_params(16) if method == "lora" else shape.params
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


# ----------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------

@dataclass
class PlanRow:
    stage: str  # ICL | FT | circuits | ladder ICL | ladder FT
    model: str
    what: str
    count: str  # "19 cells", "3 runs"
    how: str  # where it runs: "1 GPU", "ZeRO-3 x4", "CPU"
    device_gib: float | None  # estimated peak per device (None: model size unknown)
    host_gib: float | None  # host RAM needed besides (offload)
    seconds: float | None
    fits: bool | None  # None: not estimated
    in_process: bool = True  # reproduce.py can run it itself (one process, one device)
    note: str = ""  # what would fit, or the command that runs it
    runs: list = field(default_factory=list)  # the study.FTRun objects of an FT row
    launch: str = ""  # the launcher command of a run reproduce.py cannot run in-process


@dataclass
class Plan:
    config_name: str
    machine: Machine
    rows: list[PlanRow]
    totals: dict[str, int]

    @property
    def problems(self) -> list[PlanRow]:
        return [r for r in self.rows if r.fits is False]

    @property
    def seconds(self) -> float:
        return sum(r.seconds or 0.0 for r in self.rows)


def _short(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def _gib(x: float) -> float:
    return round(x / GIB, 1)


def _items(config: dict, task: str) -> int:
    from .tasks import get_task

    ev, data = config["eval"], config["data"]
    try:
        splits = get_task(task, data["task_params"].get(task)).splits
    except (ConfigError, KeyError):
        splits = ("pattern", "control")
    per_split = {"pattern": data["test_pattern"], "control": data["test_control"]}
    return sum(min(per_split.get(s, 0), ev["limit"]) if ev["limit"] else per_split.get(s, 0)
               for s in ev["splits"] if s in splits)


def _eval_row(config: dict, model: str, shape: Shape | None, task: str, shots: list[int], seeds: list[int],
              machine: Machine, stage: str = "ICL", what: str | None = None) -> PlanRow:
    cells = [(k, _items(config, task)) for k in shots for _ in ([None] if k == 0 else seeds)]
    label = what or f"{task}: k {','.join(map(str, shots))} x demo seeds {','.join(map(str, seeds))}; " \
                    f"{cells[0][1] if cells else 0} items per cell"
    how = "1 GPU" if machine.cuda else "CPU"
    if shape is None:
        return PlanRow(stage, model, label, f"{len(cells)} cells", how, None, None, None, None,
                       note="model size unknown here: not estimated")
    dtype = compute_dtype(config, model, machine.cuda)
    nbytes = 4 if dtype == "fp32" else 2
    row_ft, _, answer, demo, query, query_max = task_tokens(task)
    extra = CHAT_TOKENS if config["prompt_style"] == "chat" else 0
    new_tokens = config["eval"]["max_new_tokens"] or answer + 2
    k_max = max(shots) if shots else 0
    context = HEADER_TOKENS + k_max * demo * 1.15 + query_max + extra + new_tokens  # 15%: demos longer than the mean
    per_item = config["eval"]["demo_mode"] == "per_item"
    est = eval_memory(shape, weight_bytes=nbytes, batch=config["eval"]["batch_size"], context=context,
                      query=(context if per_item else query_max + extra + new_tokens))
    secs = eval_seconds(shape, cells=cells, query=query + extra, demo=demo, new_tokens=new_tokens,
                        batch=config["eval"]["batch_size"], weight_bytes=nbytes, half=nbytes == 2,
                        cuda=machine.cuda, per_item=per_item) + load_seconds(shape, nbytes, machine.cuda)
    ok = fits(est, machine)
    note = "" if ok else _eval_alternatives(est, machine, config)
    return PlanRow(stage, model, label, f"{len(cells)} cells", how, _gib(est.device), None, secs, ok, note=note)


def _eval_alternatives(est: Estimate, machine: Machine, config: dict) -> str:
    need = needed(est, machine.cuda) / FIT_FRACTION
    where = "a GPU" if machine.cuda else "host RAM"
    return (f"needs ~{need / GIB:.0f} GiB of {where}; would fit: a smaller eval.batch_size (now "
            f"{config['eval']['batch_size']}), or a device with >= {need / GIB:.0f} GiB")


def _strategies(machine: Machine, ft: dict) -> list[tuple[str, int]]:
    """(strategy, processes) in the order tried: in-process on one device, then ZeRO-3 over the most GPUs
    whose count keeps processes x per-device batch a divisor of ft.batch_size, then the same with the
    optimizer in host memory (also on one GPU)."""
    out: list[tuple[str, int]] = [("single", 1)]
    if not machine.cuda:
        return out
    counts = [n for n in range(machine.gpus, 0, -1) if accumulation_for(ft, n) is not None]
    if counts and counts[0] > 1:
        out.append(("zero3", counts[0]))
    if counts:
        out.append(("zero3_offload", counts[0]))
    return out


STRATEGY_LABEL = {"single": "1 GPU", "zero3": "ZeRO-3 x{n}", "zero3_offload": "ZeRO-3 + CPU offload x{n}"}
ACCELERATE_FILE = {"zero3": "deepspeed_zero3.yaml", "zero3_offload": "deepspeed_zero3_offload.yaml"}


def _ft_estimate(shape: Shape, ft: dict, config: dict, model: str, machine: Machine, strategy: str,
                 n: int) -> tuple[Estimate, FTShape, bool]:
    dtype = compute_dtype(config, model, machine.cuda)
    half = dtype != "fp32"
    fts = ft_shape(ft, config, n)
    est = train_memory(shape, ft["method"], tokens=fts.tokens_per_pass, logit_positions=fts.logit_positions,
                       lora_r=ft["lora"]["r"], half=half, optimizer=ft["optimizer"],
                       accumulation=accumulation_for(ft, n) or 1, checkpointing=ft["gradient_checkpointing"],
                       strategy=strategy, n_gpus=n, cuda=machine.cuda)
    return est, fts, half


def _ft_row(config: dict, runs: list, shape: Shape | None, machine: Machine, results: Path,
            config_arg: Invocation, stage: str = "FT") -> PlanRow:
    first = runs[0]
    ft, model = first.config["ft"], first.model
    tasks = sorted({t for r in runs for t in r.tasks}, key=list(config["data"]["tasks"]).index) \
        if all(t in config["data"]["tasks"] for r in runs for t in r.tasks) else sorted({t for r in runs for t in r.tasks})
    groups = sorted({"+".join(r.tasks) for r in runs}, key=lambda g: [tasks.index(t) for t in g.split("+")])
    seeds = sorted({r.train_seed for r in runs})
    label = (f"{first.protocol} ({ft['method']}) N={first.n_train}: "
             f"{', '.join(groups) if len(groups) <= 2 else f'{len(groups)} tasks one at a time'}, "
             f"seeds {','.join(map(str, seeds))}")
    if shape is None:
        return PlanRow(stage, model, label, f"{len(runs)} runs", "?", None, None, None, None,
                       note="model size unknown here: not estimated", runs=runs)
    best = None
    for strategy, n in _strategies(machine, ft):
        # the largest pass over the row's task groups
        ests = [_ft_estimate(shape, r.config["ft"], config, model, machine, strategy, n) for r in runs]
        est, fts, half = max(ests, key=lambda e: e[0].device)
        if fits(est, machine):
            best = (strategy, n, est, half)
            break
    single_est, _, half = max((_ft_estimate(shape, r.config["ft"], config, model, machine, "single", 1) for r in runs),
                              key=lambda e: e[0].device)
    seconds = 0.0
    strategy, n, est = (best[0], best[1], best[2]) if best else ("single", 1, single_est)
    for r in runs:
        fts = ft_shape(r.config["ft"], config, n)
        seconds += train_seconds(shape, r.config["ft"]["method"], fts, half=half, cuda=machine.cuda,
                                 strategy=strategy, processes=n,
                                 accumulation=accumulation_for(r.config["ft"], n) or 1)
        seconds += _ft_eval_seconds(config, r, shape, machine)
    how = STRATEGY_LABEL[strategy].format(n=n) if machine.cuda else "CPU"
    row = PlanRow(stage, model, label, f"{len(runs)} runs", how, _gib(est.device),
                  _gib(est.host) if est.host else None, seconds, best is not None, in_process=strategy == "single",
                  runs=runs)
    if best is None:
        row.note = _ft_alternatives(shape, ft, config, model, machine, single_est)
    elif strategy != "single":
        row.launch = launch_command(config, first, strategy, n, results, config_arg)
        row.note = (f"reproduce.py runs one process: launch these first ({ACCELERATE_FILE[strategy]}, one "
                    f"command per seed); reproduce.py then reuses the folders")
    return row


def _ft_eval_seconds(config: dict, run, shape: Shape, machine: Machine) -> float:
    cfg = run.config
    nbytes = 4 if compute_dtype(config, run.model, machine.cuda) == "fp32" else 2
    total = 0.0
    for task in run.tasks:
        _, _, answer, demo, query, _ = task_tokens(task)
        shots = list(config["reproduce"]["ft_eval_shots"])
        cells = [(k, _items(cfg, task)) for k in shots]
        total += eval_seconds(shape, cells=cells, query=query, demo=demo,
                              new_tokens=config["eval"]["max_new_tokens"] or answer + 2,
                              batch=config["eval"]["batch_size"], weight_bytes=nbytes, half=nbytes == 2,
                              cuda=machine.cuda)
    return total + load_seconds(shape, nbytes, machine.cuda)


def _ft_alternatives(shape: Shape, ft: dict, config: dict, model: str, machine: Machine, single: Estimate) -> str:
    """One line: what the run needs on one device and what would fit (on this machine, else on which)."""
    where = "the GPU" if machine.cuda else "host RAM"
    have = (machine.gpu_bytes if machine.cuda else machine.host_bytes) / GIB
    options = []
    if ft["method"] != "lora":
        est, _, _ = _ft_estimate(shape, {**ft, "method": "lora"}, config, model, machine, "single", 1)
        if fits(est, machine):
            options.append(f"LoRA here (~{needed(est, machine.cuda) / GIB:.0f} GiB)")
    if not ft["gradient_checkpointing"]:
        est, _, _ = _ft_estimate(shape, {**ft, "gradient_checkpointing": True}, config, model, machine, "single", 1)
        if fits(est, machine):
            options.append(f"ft.gradient_checkpointing=true here (~{needed(est, machine.cuda) / GIB:.0f} GiB)")
    gpu_gib = machine.gpu_bytes / GIB if machine.cuda else 80.0
    gpu = Machine(1, gpu_gib * GIB, machine.host_bytes, "")
    est, _, _ = _ft_estimate(shape, ft, config, model, gpu, "single", 1)
    if not machine.cuda and fits(est, gpu):
        options.append(f"one GPU with >= {needed(est, True) / FIT_FRACTION / GIB:.0f} GiB")
    if ft["method"] != "lora" or not fits(est, gpu):
        offload, _, _ = _ft_estimate(shape, ft, config, model, gpu, "zero3_offload", 1)
        options.append(f"ZeRO-3 with CPU offload on one {gpu_gib:.0f} GiB GPU (~{needed(offload, True) / GIB:.0f} GiB "
                       f"GPU + ~{(offload.host + CPU_OVERHEAD) / FIT_FRACTION / GIB:.0f} GiB host RAM: "
                       f"configs/accelerate/deepspeed_zero3_offload.yaml)")
        for n in range(2, 65):
            if accumulation_for(ft, n) is None:
                continue
            est, _, _ = _ft_estimate(shape, ft, config, model, Machine(n, gpu_gib * GIB, machine.host_bytes, ""),
                                     "zero3", n)
            if needed(est, True) <= FIT_FRACTION * gpu_gib * GIB:
                options.append(f"ZeRO-3 on {n} x {gpu_gib:.0f} GiB GPUs (~{needed(est, True) / GIB:.0f} GiB each: "
                               f"configs/accelerate/deepspeed_zero3.yaml --num_processes {n})")
                break
    return (f"needs ~{needed(single, machine.cuda) / GIB:.0f} GiB on one device, {where} has {have:.0f} GiB; "
            f"would fit: " + "; or ".join(options))


def _value(v: Any) -> str:
    """``v`` as YAML that parses back to the same value (a float keeps a dot: YAML reads 1e-05 as a string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        mantissa, _, exponent = text.partition("e")
        return text if "." in mantissa or not exponent else f"{mantissa}.0e{exponent}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


@dataclass(frozen=True)
class Invocation:
    """How reproduce.py was started, so a launch command trains into its folders with its settings."""

    config_arg: str | None = None  # --config as typed (None: no --config)
    data: Path | None = None  # --data (default data/<config name>)
    overrides: tuple[str, ...] = ()  # KEY=VALUE overrides on its command line


def launch_command(config: dict, run, strategy: str, n: int, results: Path, how: Invocation | None = None) -> str:
    """The ``accelerate launch`` command that trains ``run`` into the folder reproduce.py reads (the
    run's ft section as overrides of the config's)."""
    how = how or Invocation(f"configs/{config['name']}.yaml" if config["name"] else None)
    overrides = [f"'{o}'" if any(c in o for c in "[]{} ,") else o for o in how.overrides]
    for key, value in run.config["ft"].items():
        if config["ft"].get(key) != value:
            text = f"ft.{key}={_value(value)}"
            overrides.append(f"'{text}'" if any(c in text for c in "[]{} ,") else text)
    procs = f" --num_processes {n}" if n != 1 or strategy == "zero3" else ""
    out = results / "ft" / run.rel
    data = how.data or Path("data") / (config["name"] or "default")
    config_flag = f"--config {how.config_arg} " if how.config_arg else ""
    return (f"accelerate launch --config_file configs/accelerate/{ACCELERATE_FILE[strategy]}{procs} finetune.py "
            f"{config_flag}--model {run.model} --data {data} --out {out} {' '.join(overrides)}").rstrip()


def plan_study(config: dict, machine: Machine | None = None, results: Path | None = None,
               invocation: Invocation | None = None) -> Plan:
    """Every ICL cell, FT run (with its evaluation), ladder rung and circuit analysis ``config`` implies,
    grouped into rows (ICL: model x task; FT: model x protocol x N, its tasks and seeds), each with
    its estimated peak memory, time and whether it fits ``machine`` (default: this one)."""
    from .study import models_of, plan_ft

    machine = machine or detect_machine()
    name = config["name"] or "default"
    results = Path(results) if results is not None else Path("results") / name
    config_arg = invocation or Invocation(f"configs/{name}.yaml" if config["name"] else None)
    rows: list[PlanRow] = []
    totals = {"icl_cells": 0, "ft_runs": 0, "models": 0}
    shapes: dict[str, Shape | None] = {}

    def shape_of(model: str) -> Shape | None:
        if model not in shapes:
            shapes[model] = model_shape(model)
        return shapes[model]

    ft_runs = plan_ft(config)
    models = models_of(config) if (config["reproduce"]["icl"] or ft_runs) else []
    totals["models"] = len(models)
    tasks = list(config["eval"]["tasks"] or config["data"]["tasks"])
    for model in models:
        if config["reproduce"]["icl"]:
            for task in tasks:
                row = _eval_row(config, model, shape_of(model), task, list(config["eval"]["shots"]),
                                list(config["eval"]["demo_seeds"]), machine)
                totals["icl_cells"] += int(row.count.split()[0])
                rows.append(row)
        groups: dict[tuple, list] = {}
        for run in (r for r in ft_runs if r.model == model):
            groups.setdefault((run.protocol, run.n_train), []).append(run)
        for runs in groups.values():
            rows.append(_ft_row(config, runs, shape_of(model), machine, results, config_arg))
            totals["ft_runs"] += len(runs)
    if config["ladder"]["rungs"]:
        rows.extend(_ladder_rows(config, machine, results, shape_of, config_arg))
    if config["circuits"]["enabled"]:
        for model in models_of(config):
            rows.append(_circuits_row(config, model, shape_of(model), machine))
    return Plan(name, machine, rows, totals)


def _ladder_rows(config: dict, machine: Machine, results: Path, shape_of, config_arg: Invocation) -> list[PlanRow]:
    from .ladder import plan_ladder
    from .study import FTRun

    rows = []
    seen: set[str] = set()
    for rung in plan_ladder(config, results):
        cfg, model = rung.config, rung.config["model"]
        if str(rung.icl_dir) not in seen:
            seen.add(str(rung.icl_dir))
            for task in cfg["eval"]["tasks"]:
                rows.append(_eval_row(cfg, model, shape_of(model), task, list(cfg["eval"]["shots"]),
                                      list(cfg["eval"]["demo_seeds"]), machine, stage=f"ladder {rung.index} ICL"))
        for group, ft_cfg, ft_dir, _ in rung.ft:
            if str(ft_dir) in seen:
                continue
            seen.add(str(ft_dir))
            run = FTRun(model, f"rung{rung.index}", tuple(group), ft_cfg["ft"]["n_train"], ft_cfg["ft"]["train_seed"],
                        ft_cfg)
            rows.append(_ft_row(cfg, [run], shape_of(model), machine, results, config_arg,
                                stage=f"ladder {rung.index} FT"))
    return rows


def _circuits_row(config: dict, model: str, shape: Shape | None, machine: Machine) -> PlanRow:
    circ = config["circuits"]
    label = (f"circuit shift: {', '.join(circ['tasks'])}; {circ['n_items']} pairs, {circ['shots']} shots, "
             f"{circ['method']}, {circ['dtype']}")
    how = "1 GPU" if machine.cuda else "CPU"
    if shape is None:
        return PlanRow("circuits", model, label, f"{len(circ['tasks'])} tasks", how, None, None, None, None,
                       note="model size unknown here: not estimated")
    nbytes = 4 if str(circ["dtype"]).lower() in ("fp32", "float32", "float") else 2
    demo = max(task_tokens(t)[3] for t in circ["tasks"])
    query = max(task_tokens(t)[5] for t in circ["tasks"])
    tokens = 2 * (HEADER_TOKENS + circ["shots"] * demo + query)  # clean + corrupted, one backward pass
    acts = shape.activation_bytes(tokens, lora=False, half=nbytes == 2)
    logits = 2 * shape.vocab * 4
    est = Estimate(shape.params * nbytes + acts + logits, 0.0, {"weights": shape.params * nbytes, "activations": acts})
    if circ["method"] != "attribution" or circ["activation_items"]:
        est.device += eval_memory(shape, weight_bytes=nbytes, batch=circ["batch_size"], context=tokens / 2,
                                  query=query).parts["kv_cache"]
    # per pair and condition (base, ICL, FT): one forward + backward (~3 forwards) over the clean and the
    # corrupted item after the cached prefix; the prefix once per task and condition
    rate = _rates(machine.cuda)
    flops = rate.prefill_flops / (1.0 if nbytes == 2 else rate.fp32_slowdown)
    mean_query = sum(task_tokens(t)[4] for t in circ["tasks"]) / len(circ["tasks"])
    attribution = 3 * 2 * mean_query * 2 * shape.matmul_params / flops
    exact = shape.layers * (shape.heads + 1) * mean_query * 2 * shape.matmul_params / flops  # a pass per component
    exact_pairs = circ["n_items"] if circ["method"] != "attribution" else min(circ["activation_items"], circ["n_items"])
    attribution_pairs = circ["n_items"] if circ["method"] != "activation" else 0
    prefix = (HEADER_TOKENS + circ["shots"] * demo) * 2 * shape.matmul_params / flops
    secs = 3 * len(circ["tasks"]) * (attribution_pairs * attribution + exact_pairs * exact + prefix) \
        + load_seconds(shape, nbytes, machine.cuda)
    ok = fits(est, machine)
    return PlanRow("circuits", model, label, f"{len(circ['tasks'])} tasks", how, _gib(est.device), None, secs, ok,
                   note="" if ok else _eval_alternatives(est, machine, config))


# ----------------------------------------------------------------------------------------------------
# output and the check before a run
# ----------------------------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_plan(plan: Plan) -> str:
    """The plan as markdown: the machine, one table row per group of cells or runs, the launch
    commands of runs reproduce.py cannot run in-process, and one line per run that does not fit."""
    m = plan.machine
    rates = GPU_RATES if m.cuda else CPU_RATES
    lines = [f"# Plan: config `{plan.config_name}`", "",
             f"Machine: {m.label}.",
             f"{plan.totals['models']} model(s), {plan.totals['icl_cells']} ICL cells, {plan.totals['ft_runs']} "
             f"fine-tuning runs (each evaluated after training).",
             f"Peak memory: estimated per device (iclvsft/plan.py); a run fits when the estimate + "
             f"{(CUDA_OVERHEAD if m.cuda else CPU_OVERHEAD) / GIB:.0f} GiB of process overhead is at most "
             f"{FIT_FRACTION:.0%} of the memory. Time: estimated from {rates.label}; FT rows include the "
             f"evaluation of each fine-tuned model.", "",
             "| # | stage | model | what | runs | how | peak GiB | host GiB | time | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(plan.rows, 1):
        fit = "?" if r.fits is None else ("yes" if r.fits else "**no**")
        lines.append(f"| {n} | {r.stage} | {_short(r.model)} | {r.what} | {r.count} | {r.how} | "
                     f"{'?' if r.device_gib is None else f'{r.device_gib:.1f}'} | "
                     f"{'–' if r.host_gib is None else f'{r.host_gib:.0f}'} | {_duration(r.seconds)} | {fit} |")
    in_process = sum(r.seconds or 0.0 for r in plan.rows if r.in_process)
    launched = sum(r.seconds or 0.0 for r in plan.rows if not r.in_process)
    lines += ["", f"Estimated time: {_duration(in_process)} for what reproduce.py runs in sequence"
              + (f", plus {_duration(launched)} of launched runs" if launched else "") + "."]
    launches = [r for r in plan.rows if r.launch]
    if launches:
        lines += ["", "Runs that need a launcher (reproduce.py reuses their folders once finished; one command per "
                  "seed and task group, the first shown):", ""]
        lines += [f"* row {plan.rows.index(r) + 1}: `{r.launch}`" for r in launches]
    unknown = [r for r in plan.rows if r.fits is None]
    if unknown:
        lines += ["", f"Not estimated (model size unknown without its config.json): "
                  f"{', '.join(sorted({_short(r.model) for r in unknown}))}."]
    if plan.problems:
        lines += ["", "Runs that do not fit this machine:", ""]
        lines += [f"* row {plan.rows.index(r) + 1} ({r.stage}, {_short(r.model)}, {r.what}): {r.note}"
                  for r in plan.problems]
    else:
        lines += ["", "Every run fits this machine." if not unknown else "Every estimated run fits this machine."]
    return "\n".join(lines) + "\n"


def _finished(results: Path, run) -> bool:
    return (results / "ft" / run.rel / "summary.json").is_file()


def check_plan(config: dict, machine: Machine | None = None, results: Path | None = None,
               invocation: Invocation | None = None) -> Plan:
    """Refuse, before any work, a study with a run that cannot run here: one that does not fit this
    machine, or one that needs a launcher (ZeRO-3) and whose folder under ``results`` is not finished.
    Raises :class:`ConfigError` with one line naming the first such run and what would fit; returns
    the plan otherwise. Runs of unknown size are not refused."""
    plan = plan_study(config, machine, results, invocation)
    results = Path(results) if results is not None else Path("results") / plan.config_name
    for row in plan.rows:
        if row.fits is False:
            more = sum(1 for r in plan.rows if r.fits is False) - 1
            raise ConfigError(f"{row.stage} {_short(row.model)} {row.what}: {row.note}"
                              + (f" ({more} more: reproduce.py --plan lists them)" if more else ""))
        if row.fits and not row.in_process:
            todo = [r for r in row.runs if not _finished(results, r)] if row.stage == "FT" else row.runs
            if todo:
                command = launch_command(config, todo[0], *_strategy_of(row), results, invocation)
                raise ConfigError(f"{row.stage} {_short(row.model)} {row.what} needs {row.how} on this machine "
                                  f"(~{row.device_gib:.0f} GiB per GPU), more than reproduce.py's one process: run "
                                  f"`{command}` for each of its {len(todo)} unfinished runs first (reproduce.py --plan "
                                  f"lists them), then rerun")
    return plan


def _strategy_of(row: PlanRow) -> tuple[str, int]:
    n = int(re.search(r"x(\d+)", row.how).group(1)) if re.search(r"x(\d+)", row.how) else 1
    return ("zero3_offload" if "offload" in row.how else "zero3"), n


# ----------------------------------------------------------------------------------------------------
# accelerate configs
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccelerateCheck:
    path: str
    distributed_type: str
    processes: int
    accumulation: int
    deepspeed_file: str | None


def read_accelerate_config(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"accelerate config {path}: cannot read it ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"accelerate config {path}: not a mapping")
    return data


def check_accelerate_config(path: str | Path, ft: dict, num_processes: int | None = None,
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
    per_step = ft["per_device_batch_size"] * processes
    if ft["batch_size"] % per_step:
        pd = [d for d in range(ft["per_device_batch_size"], 0, -1) if ft["batch_size"] % (d * processes) == 0]
        procs = [n for n in range(processes, 0, -1) if ft["batch_size"] % (ft["per_device_batch_size"] * n) == 0]
        fixes = []
        if pd:
            fixes.append(f"ft.per_device_batch_size={pd[0]}")
        if procs:
            fixes.append(f"--num_processes {procs[0]}")
        raise ConfigError(f"{path}: {processes} processes x ft.per_device_batch_size {ft['per_device_batch_size']} "
                          f"= {per_step} rows per pass does not divide ft.batch_size {ft['batch_size']}; set "
                          + " or ".join(fixes))
    accumulation = ft["batch_size"] // per_step
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
        expected = {"train_batch_size": ft["batch_size"], "train_micro_batch_size_per_gpu": ft["per_device_batch_size"],
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


__all__ = [
    "ACT_FULL", "ACT_LORA", "CPU_RATES", "GIB", "GPU_RATES", "KNOWN_SHAPES", "LOGIT_BYTES", "AccelerateCheck",
    "Estimate", "Invocation", "Machine", "Plan", "PlanRow", "Shape", "check_accelerate_config", "check_plan", "detect_machine",
    "eval_memory", "model_shape", "plan_study", "read_accelerate_config", "render_plan", "train_memory",
]
