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

The package: :mod:`.shapes` (model dimensions), :mod:`.machine` (this or a stated machine),
:mod:`.estimates` (constants, memory and time formulas), :mod:`.rows` (the plan's rows, their rendering
and the check before a run), :mod:`.accelerate` (accelerate files against the ft section).
"""
from .accelerate import AccelerateCheck, check_accelerate_config, read_accelerate_config
from .estimates import (
    CPU_OVERHEAD,
    CPU_RATES,
    CUDA_OVERHEAD,
    FIT_FRACTION,
    GPU_RATES,
    LOGIT_BYTES,
    Estimate,
    FTShape,
    Rates,
    accumulation_for,
    compute_dtype,
    eval_memory,
    eval_seconds,
    fits,
    ft_shape,
    load_seconds,
    needed,
    optimizer_state_bytes,
    param_bytes,
    task_tokens,
    train_memory,
    train_seconds,
)
from .machine import Machine, detect_machine, host_ram_bytes
from .rows import Invocation, Plan, PlanRow, check_plan, launch_command, plan_study, render_plan
from .shapes import ACT_FULL, ACT_LORA, GIB, KNOWN_SHAPES, Shape, model_shape, shape_from_config

__all__ = [
    "ACT_FULL", "ACT_LORA", "CPU_OVERHEAD", "CPU_RATES", "CUDA_OVERHEAD", "FIT_FRACTION", "GIB", "GPU_RATES",
    "KNOWN_SHAPES", "LOGIT_BYTES", "AccelerateCheck", "Estimate", "FTShape", "Invocation", "Machine", "Plan", "PlanRow",
    "Rates", "Shape", "accumulation_for", "check_accelerate_config", "check_plan", "compute_dtype", "detect_machine",
    "eval_memory", "eval_seconds", "fits", "ft_shape", "host_ram_bytes", "launch_command", "load_seconds",
    "model_shape", "needed", "optimizer_state_bytes", "param_bytes", "plan_study", "read_accelerate_config", "render_plan",
    "shape_from_config", "task_tokens", "train_memory", "train_seconds",
]
