#!/usr/bin/env python
"""Training throughput: our fine-tuning setup against the authors', on the same rows, same machine.

Setups (all through :func:`iclvsft.train.finetune`, same model, rows, row order, batch and precision):

* ``authors``:   full FT, every row padded to 512 tokens, loss over the whole sequence, no eos
                 (their finetune.py: a plain Trainer with DataCollatorForLanguageModeling);
* ``ours_full``: full FT, padding-free batches, loss on the completion, fused AdamW, output layer only
                 at labelled positions (``ft.logits_on: labels``);
* ``ours_lora``: LoRA (r 16, all linear layers), the same: our default;
* ``*_v1``:      the same with the earlier per-tensor AdamW and full logits (``ft.optimizer=adamw_torch
                 ft.logits_on=all``), to measure those two changes side by side;
* ``ours_lora_bf16in``: ``ours_lora`` with peft's cast of each adapter's input to fp32 turned off (not a
                 config key: a candidate change, measured with its loss curve before it becomes one);
* ``ours_lora_compiled``, ``ours_full_compiled``: the same setups with every decoder layer compiled by
                 ``torch.compile`` (inductor, dynamic shapes: padding-free batches change length every
                 step), same maths; the first steps compile, so give ``--warmup 2`` or more.

For each, ``--warmup`` optimizer steps are run and dropped, then ``--steps`` are timed (real tokens
per step from ``train_log.jsonl``; wall and process CPU seconds per step from a callback, step end to
step end). Reported: rows/s, real tokens/s, seconds per epoch of ``--epoch-rows`` rows, and the
ratio to ``authors``. Real tokens exclude padding.

Clock (``--clock``): ``wall`` on a quiet machine; ``cpu`` (process CPU seconds) on a shared one.
With ``--threads 1`` no thread ever spins waiting for a descheduled sibling, so CPU time is the work
done whatever else runs on the machine (other processes on 2 cores inflated wall time per step 10-20x
while this was written, and unevenly between setups); the matmul rate is then measured on 1 thread too.

FLOP/s: model FLOPs per real token, ``k * N + a * 4 * L * d_attn * ctx``, where N counts the weights
used in matmuls (all but the input embedding; the output head included), ctx is the mean causal
context of a row ((len + 1) / 2), k = 6 for full FT (forward 2, backward 4) and 4 for LoRA (frozen
weights get no weight gradient), a = 3 (attention has no weights; its backward is twice its
forward). "useful" FLOP/s = FLOPs of the real tokens per second; for ``authors`` "executed" also
counts the pad tokens the hardware computes. Both are compared with a measured dense matmul rate
(2048 x 2048, the training dtype and fp32) on the same machine.

    python benchmarks/bench_train.py --model qwen2.5-coder-0.5b-instruct --task expression
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# "_v1": the setup before the fused optimizer and the labelled-logits output layer (same rows, same
# seed), so each speed-up and the loss curve are compared side by side in one run.
V1 = ["ft.optimizer=adamw_torch", "ft.logits_on=all"]
SETUPS = {
    "authors": ["ft.method=full", "ft.learning_rate=1.0e-5", "ft.loss_on=sequence", "ft.batching=max_length",
                "ft.max_length=512", "ft.append_eos=false", *V1],
    "ours_full_v1": ["ft.method=full", "ft.learning_rate=1.0e-5", "ft.loss_on=completion", "ft.batching=padding_free",
                     *V1],
    "ours_full": ["ft.method=full", "ft.learning_rate=1.0e-5", "ft.loss_on=completion", "ft.batching=padding_free"],
    "ours_lora_v1": ["ft.method=lora", "ft.learning_rate=2.0e-4", "ft.loss_on=completion", "ft.batching=padding_free",
                     *V1],
    "ours_lora": ["ft.method=lora", "ft.learning_rate=2.0e-4", "ft.loss_on=completion", "ft.batching=padding_free"],
}


def no_input_cast():
    """A Trainer callback that turns peft's cast of adapter inputs off when training begins."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import TrainerCallback

    class NoInputCast(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            assert layers, "no LoRA layer found"
            for layer in layers:
                layer.cast_input_dtype_enabled = False

    return NoInputCast()


def compiled_layers():
    """A Trainer callback that compiles every decoder layer in place when training begins."""
    from transformers import TrainerCallback

    class CompileLayers(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
            assert layers, "no decoder layer found"
            for layer in layers:
                layer.compile(dynamic=True)

    return CompileLayers()


# Benchmark-only variants (no config key): what a change would gain, measured before it becomes one.
# "_bf16in": peft's switch `cast_input_dtype_enabled = False` on every LoRA layer, so an adapter's input stays
# bf16 under autocast instead of being copied to the adapter's fp32 and back (dropout then draws on the bf16
# tensor, whose 1/(1-p) scale rounds in bf16: 1/0.95 -> 1.0547, +0.2%: not the same maths).
# "_compiled": torch.compile on each decoder layer (regional compilation, rather than the whole model), meant to
# fuse the elementwise work around the matmuls (norms, rotary, SiLU, LoRA's casts and dropout); the matmuls
# and the maths stay (compiled dropout draws its masks from inductor's own generator, so the masks differ).
# Each variant: the setup it changes and the callback (a factory of a TrainerCallback) that changes it.
VARIANTS = {"ours_lora_bf16in": ("ours_lora", no_input_cast), "ours_lora_compiled": ("ours_lora", compiled_layers),
            "ours_full_compiled": ("ours_full", compiled_layers)}


def matmul_rate(dtype, n: int = 2048, reps: int = 10, clock: str = "wall") -> float:
    """Dense ``n x n @ n x n`` FLOP/s in ``dtype`` (best of ``reps``, after a warm-up), by ``clock``."""
    import torch

    now = time.process_time if clock == "cpu" else time.perf_counter
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        start = now()
        torch.matmul(a, b)
        best = min(best, now() - start)
    return 2 * n ** 3 / best


def matmul_params(model_config, n_params: int) -> int:
    """Weights used in matmuls per token: all parameters but the input embedding (a lookup)."""
    embedding = model_config.vocab_size * model_config.hidden_size
    return n_params if getattr(model_config, "tie_word_embeddings", False) else n_params - embedding


def flops_per_token(model_config, n_params: int, method: str, row_length: float) -> float:
    """Training FLOPs per token (see the module docstring)."""
    k = 6 if method == "full" else 4
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    ctx = (row_length + 1) / 2
    attention_forward = 4 * model_config.num_hidden_layers * heads * head_dim * ctx
    return k * matmul_params(model_config, n_params) + 3 * attention_forward


def step_clock():
    """A TrainerCallback recording wall and process CPU seconds of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            self.wall.append(wall - self._mark[0])
            self.cpu.append(cpu - self._mark[1])
            self._mark = (wall, cpu)

    return StepClock()


def step_profiler(step: int):
    """A TrainerCallback running torch.profiler over optimizer step ``step`` (1-based) only; ``ops`` then
    holds the top operators by self CPU time (the calling thread's time in each, sub-operators excluded,
    so they add up to the time spent in operators) and ``total`` their sum over all operators."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.prof, self.ops, self.total = None, [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == step:
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                self.total = sum(e.self_cpu_time_total for e in events) / 1e6
                self.ops = sorted(({"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3)}
                                   for e in events), key=lambda o: -o["self_cpu_s"])[:25]
                self.prof = None

    return StepProfiler()


def run_setup(name: str, base: list[str], data_dir: Path, workdir: Path, warmup: int, steps: int,
              clock: str, profile: bool = False) -> dict:
    from iclvsft.config import load_config
    from iclvsft.train import finetune

    base_setup, variant_callback = VARIANTS.get(name, (name, None))
    overrides = SETUPS[base_setup]
    config = load_config(None, [*base, *overrides, f"ft.max_steps={warmup + steps}", "ft.save_steps=0",
                                "ft.logging_steps=1", "ft.warmup_steps=0", "ft.lr_scheduler=constant"])
    started = time.perf_counter()
    timer = step_clock()
    extra = [variant_callback()] if variant_callback else []
    profiler = step_profiler(warmup + 1) if profile else None  # the first timed step
    extra += [profiler] if profiler else []
    result = finetune(config, workdir / name, data_dir, callbacks=[timer, *extra], show_progress=False)
    log = [json.loads(line) for line in (workdir / name / "train_log.jsonl").read_text().splitlines()]
    timed = log[warmup:]
    wall, cpu = sum(timer.wall[warmup:]), sum(timer.cpu[warmup:])
    seconds = cpu if clock == "cpu" else wall
    tokens = sum(e["tokens"] for e in timed)
    ft = config.ft.to_dict()
    rows = len(timed) * ft["batch_size"]
    summary = result.summary
    model_config = result.model.config if ft["method"] == "full" else result.model.base_model.model.config
    n_params = summary["model_info"]["n_params"]
    mean_len = summary["tokens_per_epoch"]["mean_row_tokens"]
    per_token = flops_per_token(model_config, n_params, ft["method"], mean_len)
    out = {
        "setup": name, "overrides": overrides, "method": ft["method"], "batching": ft["batching"],
        "precision": summary["precision"]["dtype"], "timed_steps": len(timed), "rows": rows,
        "clock": clock, "seconds": round(seconds, 3), "wall_seconds_timed": round(wall, 3),
        "cpu_seconds_timed": round(cpu, 3), "step_wall_seconds": [round(x, 3) for x in timer.wall],
        "step_cpu_seconds": [round(x, 3) for x in timer.cpu], "real_tokens": tokens, "rows_per_second": rows / seconds,
        "tokens_per_second": tokens / seconds, "mean_row_tokens": mean_len,
        "useful_flops_per_second": per_token * tokens / seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "losses": [e["loss"] for e in log],
    }
    if profiler is not None:
        out["profile"] = {"step": warmup + 1, "self_cpu_seconds": round(profiler.total, 3), "top_ops": profiler.ops}
    if ft["batching"] == "max_length":
        executed = flops_per_token(model_config, n_params, ft["method"], ft["max_length"]) * ft["max_length"] * rows
        out["executed_flops_per_second"] = executed / seconds
    if ft["logits_on"] == "labels":  # the output layer runs only at labelled positions: less work executed
        stats = summary["tokens_per_epoch"]
        unlabelled = 1 - stats["label_tokens"] / stats["tokens"]
        head = (6 if ft["method"] == "full" else 4) * model_config.vocab_size * model_config.hidden_size
        out["executed_flops_per_second"] = (per_token - head * unlabelled) * tokens / seconds
    del result
    gc.collect()
    return out


def run_trl(base: list[str], data_dir: Path, workdir: Path, warmup: int, steps: int, clock: str) -> dict:
    """``trl_lora``: TRL's SFTTrainer on the same rows, model, LoRA, batch and precision as ``ours_lora``,
    with TRL's own completion-only loss and padding-free batching (TRL tokenizes prompt + completion
    itself). Timed like the other setups."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from iclvsft.config import load_config
    from iclvsft.models import count_parameters, load_model
    from iclvsft.train import plan_precision, select_rows, tokenize_rows, training_device

    config = load_config(None, [*base, *SETUPS["ours_lora"], f"ft.max_steps={warmup + steps}"])
    ft = config.ft.to_dict()
    rows, _ = select_rows(data_dir, ft["tasks"], ft["n_train"])
    precision = plan_precision(config, training_device())
    loaded = load_model(config.model, dtype=precision.load_dtype, device="cpu")
    _, stats = tokenize_rows(rows, loaded.tokenizer, loss_on="completion", max_length=ft["max_length"])
    lora = ft["lora"]
    args = SFTConfig(output_dir=str(workdir / "trl_lora"), use_cpu=True, per_device_train_batch_size=ft["per_device_batch_size"],
                     gradient_accumulation_steps=ft["batch_size"] // ft["per_device_batch_size"],
                     learning_rate=ft["learning_rate"], lr_scheduler_type="constant", max_steps=warmup + steps,
                     optim=ft["optimizer"], bf16=precision.bf16, logging_steps=1, save_strategy="no",
                     report_to="none", seed=ft["train_seed"], completion_only_loss=True, padding_free=True,
                     max_length=None, disable_tqdm=True)  # rows are short; padding-free needs no cut
    timer = step_clock()
    started = time.perf_counter()
    trainer = SFTTrainer(model=loaded.model, args=args, processing_class=loaded.tokenizer, callbacks=[timer],
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                          for r in rows]),
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    trainer.train()
    wall, cpu = sum(timer.wall[warmup:]), sum(timer.cpu[warmup:])
    seconds = cpu if clock == "cpu" else wall
    n_rows = steps * ft["batch_size"]
    tokens = n_rows * stats["mean_row_tokens"]  # the same rows as ours; TRL's joint tokenization may differ slightly
    n_params = count_parameters(trainer.model)
    per_token = flops_per_token(loaded.model.config, n_params, "lora", stats["mean_row_tokens"])
    return {"setup": "trl_lora", "overrides": ["trl.SFTTrainer", "completion_only_loss", "padding_free"],
            "method": "lora", "batching": "padding_free", "precision": precision.dtype, "timed_steps": steps,
            "rows": n_rows, "clock": clock, "seconds": round(seconds, 3), "step_wall_seconds": timer.wall,
            "rows_per_second": n_rows / seconds, "tokens_per_second": tokens / seconds,
            "mean_row_tokens": stats["mean_row_tokens"], "useful_flops_per_second": per_token * tokens / seconds,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="any name iclvsft.models loads")
    p.add_argument("--task", default="expression", help="the task whose first rows are trained on")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per setup")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step (ft.batch_size)")
    p.add_argument("--per-device", type=int, default=2, help="rows per forward pass (ft.per_device_batch_size)")
    p.add_argument("--epoch-rows", type=int, default=256, help="rows per epoch for the seconds-per-epoch column")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated: " + ", ".join([*SETUPS, *VARIANTS, "trl_lora"])
                   + " (trl_lora: TRL's SFTTrainer, needs trl from requirements-dev.txt)")
    p.add_argument("--dtype", default="auto", help="config key dtype (auto: bf16 where the CPU has it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time steps by wall clock, or by process CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="profile the first timed step of each setup (torch.profiler, CPU): its top operators by "
                        "self CPU time are printed and written to the JSON (that step is slower for it)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from iclvsft.config import load_config
    from iclvsft.data import generate
    from iclvsft.io import provenance, write_json

    rows_needed = (args.warmup + args.steps) * args.batch_size
    base = [f"model={args.model}", f"dtype={args.dtype}", f"ft.tasks=[{args.task}]", f"ft.n_train={rows_needed}",
            f"ft.batch_size={args.batch_size}", f"ft.per_device_batch_size={args.per_device}"]
    results: dict = {"model": args.model, "task": args.task, "rows": rows_needed, "clock": args.clock,
                     "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data_dir = Path(tmp) / "data"
        generate(load_config(None, [f"data.tasks=[{args.task}]", f"data.train_pattern={rows_needed}",
                                    "data.train_control=0", "data.test_pattern=1", "data.test_control=1"]),
                 data_dir, show_progress=False)
        runs = [run_trl(base, data_dir, Path(tmp), args.warmup, args.steps, args.clock) if name == "trl_lora" else
                run_setup(name, base, data_dir, Path(tmp), args.warmup, args.steps, args.clock, args.profile)
                for name in args.setups.split(",")]
    precision = runs[0]["precision"]
    rates = {"float32": matmul_rate(torch.float32, clock=args.clock)}
    if precision != "float32":
        rates[precision] = matmul_rate(getattr(torch, precision), clock=args.clock)
    results.update(matmul_flops_per_second=rates, setups=runs, provenance=provenance())
    ref = next((r for r in runs if r["setup"] == "authors"), runs[0])
    peak = rates[precision]

    print(f"\n{args.model}, task {args.task}, {rows_needed} rows, batch {args.batch_size} "
          f"({args.per_device} per forward), {args.steps} timed steps, {precision}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    print("matmul 2048^3: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    header = (f"{'setup':<10} {'rows/s':>7} {'tokens/s':>9} {'s/epoch':>8} {'x authors':>9} "
              f"{'useful GFLOP/s':>14} {'% matmul':>8}")
    print(header)
    for r in runs:
        r["seconds_per_epoch"] = args.epoch_rows / r["rows_per_second"]
        r["speedup_vs_authors"] = r["tokens_per_second"] / ref["tokens_per_second"]
        r["useful_fraction_of_matmul"] = r["useful_flops_per_second"] / peak
        print(f"{r['setup']:<10} {r['rows_per_second']:7.2f} {r['tokens_per_second']:9.1f} "
              f"{r['seconds_per_epoch']:8.1f} {r['speedup_vs_authors']:9.2f} "
              f"{r['useful_flops_per_second'] / 1e9:14.1f} {100 * r['useful_fraction_of_matmul']:7.1f}%")
        if "executed_flops_per_second" in r:
            r["executed_fraction_of_matmul"] = r["executed_flops_per_second"] / peak
            what = "pads included" if r["batching"] == "max_length" else "output layer at labelled positions only"
            print(f"{'':<10} (executed, {what}: {r['executed_flops_per_second'] / 1e9:.1f} GFLOP/s, "
                  f"{100 * r['executed_fraction_of_matmul']:.1f}% of matmul)")
    for r in runs:
        if "profile" in r:
            prof = r["profile"]
            print(f"\n{r['setup']}: step {prof['step']} profiled, {prof['self_cpu_seconds']:.2f} s in operators "
                  f"(the calling thread's time in each, its sub-operators excluded)")
            for o in prof["top_ops"][:15]:
                print(f"  {o['op']:<40} {o['calls']:>6} calls {o['self_cpu_s']:7.3f} s "
                      f"{100 * o['self_cpu_s'] / prof['self_cpu_seconds']:5.1f}%")
    print(f"(s/epoch: {args.epoch_rows} rows; tokens/s counts real tokens only, so 'x authors' is also the "
          f"rows/s ratio up to row-length differences)")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
