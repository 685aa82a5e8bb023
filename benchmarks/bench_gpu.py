#!/usr/bin/env python
"""GPU figures: training throughput and MFU, ours vs TRL, the ICL engine vs ``generate``, peak memory vs the plan.

Random-weight Qwen2.5 shapes (0.5B, 1.5B, 7B; the architectures of ``bench_memory.py``) need no
download: the names ``random-qwen2-<size>`` are registered with ``iclvsft.models.load_model`` for this
process only, built on the device from their config with the byte-level tokenizer of the tiny test
model (token ids 0-257; the output rows of the other ids are zeroed so greedy decoding stays inside the
tokenizer's vocabulary; the matmul work is that of the full 152k-word output layer). Everything else
is the project's own path:

* **training**: ``iclvsft.train.finetune`` (padding-free batches, completion loss, output layer at the
  labelled positions, fused AdamW; LoRA r 16 on all linear layers with a bf16 base and fp32 adapters;
  full FT with fp32 master weights under bf16 autocast) against TRL's ``SFTTrainer`` on the same rows,
  model, method, optimizer, effective batch and precision (completion-only loss, padding-free;
  ``gradient_checkpointing=False`` like ours: TRL's own default is True). ``--warmup`` optimizer steps
  dropped, ``--steps`` timed (CUDA-synchronised, step end to step end). Model FLOPs per real token as in
  ``bench_train.py`` (6N full / 4N LoRA plus causal attention), against the card's dense bf16 peak
  (``--peak-tflops``, H200 SXM datasheet: 989) and a dense 8192^3 bf16 matmul measured in the same run.
* **memory**: CUDA allocator peak of each of our runs against ``iclvsft.plan.train_memory`` for the same
  shape, tokens per forward pass and labelled positions (the plan step's estimator).
* **evaluation**: ``iclvsft.evaluate.Evaluator`` (shared-prefix KV cache, batched, stop at end of line)
  against plain ``model.generate`` on the same prompts, one prompt at a time (the authors' loop) and
  batched (left-padded, same batch size); greedy, bf16; identical completions counted.

* **profile** (``--profile``): for ours and TRL at the first size:method pair, ``--profile-steps``
  more optimizer steps after the timed ones run under ``torch.profiler`` (CPU and, on a GPU, CUDA
  activity); the JSON gets the top ``--profile-rows`` ops by self CUDA time and by self CPU time as
  text tables, and the ops that wait for the device (synchronize, ``item``, ``nonzero``, copies)
  with their counts. The timed steps are not profiled (``step_seconds``: warm-up and timed steps;
  the profiled steps' seconds are in ``profile``).

Writes one JSON (``--out``) after every stage, so a run cut short still leaves what it measured.

    python benchmarks/bench_gpu.py --out results_gpu.json                # on a GPU
    python benchmarks/bench_gpu.py --sizes tiny --train tiny:full,tiny:lora --eval-sizes tiny --steps 2 --warmup 1 \
        --items 4 --batch-size 4 --per-device 4 --shots 2 --eval-batch 2 --profile --out /tmp/g.json  # CPU try
    python benchmarks/bench_gpu.py --sizes 0.5b,1.5b --train 0.5b:full,1.5b:full --steps 30 --eval-sizes= \
        --profile --out gpu_logits.json           # full FT step times (stalls) and where a step's time goes
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_memory import SHAPES  # noqa: E402  (the Qwen2.5 architectures, one table for both benchmarks)

PREFIX = "random-qwen2-"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_random(size: str, dtype: torch.dtype, device: torch.device, attn: str | None):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[size], max_position_embeddings=32768, use_sliding_window=False, bos_token_id=None,
                         eos_token_id=256, pad_token_id=257)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn or "sdpa")
    with torch.no_grad():  # greedy decoding stays within the byte tokenizer's 258 ids
        model.get_output_embeddings().weight[258:].zero_()
    model.name_or_path = model.config.name_or_path = PREFIX + size
    return model


def register_random_models() -> None:
    """Make ``load_model('random-qwen2-<size>')`` build a random-weight model (this process only)."""
    import iclvsft.models.loading as loading
    from iclvsft.models.tiny import build_tiny_tokenizer

    resolve, load = loading._resolve_source, loading._load_pretrained

    def _resolve(name, cache_dir, *rest):
        return ("random", name, {}) if name.startswith(PREFIX) else resolve(name, cache_dir, *rest)

    def _load(kind, source, name, dtype, device, attn):
        if kind != "random":
            return load(kind, source, name, dtype, device, attn)
        return build_random(source.removeprefix(PREFIX), dtype, device, attn), build_tiny_tokenizer()

    loading._resolve_source, loading._load_pretrained = _resolve, _load


def shape_of(size: str):
    from iclvsft.plan import shape_from_config

    return shape_from_config(dict(SHAPES[size], model_type="qwen2"), source="random " + size)


def matmul_tflops(n: int, dtype=torch.bfloat16, warmup: int = 3, reps: int = 10) -> dict:
    """Mean of ``reps`` timed ``n^3`` products after ``warmup`` (CUDA events), on random normal data."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(warmup):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    mean = (time.perf_counter() - t) / reps
    del a, b
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds_mean": mean,
            "tflops": 2 * n ** 3 / mean / 1e12}


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):  # CUDA-synchronised step-end to step-end wall seconds
        def __init__(self):
            self.wall = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self._mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            self.wall.append(now - self._mark)
            self._mark = now

    return StepClock()


# Ops whose time is the host waiting for the device (or a device-to-host copy): counted in a profile.
SYNC_OPS = ("Synchronize", "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "Memcpy", "aten::is_nonzero")


def profiler_callback(start: int, steps: int, record: dict, rows: int = 20):
    """A callback that profiles optimizer steps ``start + 1 .. start + steps`` (from the end of step
    ``start``, so the next step's batch collation is inside) and writes the tables into ``record``."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class Profile(TrainerCallback):
        prof = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None and state.global_step == start and not record:
                sync()
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                try:  # a profiler that cannot start (no CUPTI) must not cost the run's timings
                    self.prof = profile(activities=activities)
                    self.prof.__enter__()
                except Exception as error:  # noqa: BLE001
                    self.prof, record["error"] = None, f"start: {type(error).__name__}: {error}"
                self._begin = time.perf_counter()
            elif self.prof is not None and state.global_step >= start + steps:
                self.finish(state.global_step - start)

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is not None:
                self.finish(state.global_step - start)

        def finish(self, done: int):
            sync()
            prof, self.prof = self.prof, None
            try:
                prof.__exit__(None, None, None)
                record.update(profile_tables(prof, done, time.perf_counter() - self._begin, cuda, rows))
            except Exception as error:  # noqa: BLE001
                record["error"] = f"tables: {type(error).__name__}: {error}"

    return Profile()


def profile_tables(prof, steps: int, seconds: float, cuda: bool, rows: int = 20) -> dict:
    """The top ``rows`` ops by self CUDA time and by self CPU time (torch's text tables) and the ops that
    wait for the device, from a finished ``torch.profiler.profile``."""
    averages = prof.key_averages()

    def table(key: str) -> str:
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError):  # older torch: the CUDA column's key
            return averages.table(sort_by=key.replace("device", "cuda"), row_limit=rows, max_name_column_width=60)

    waits = {e.key: {"count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
                     "cpu_total_ms": round(e.cpu_time_total / 1e3, 3)}
             for e in averages if any(name in e.key for name in SYNC_OPS)}
    total_cpu = sum(e.self_cpu_time_total for e in averages)
    total_device = sum(getattr(e, "self_device_time_total", 0) or 0 for e in averages)
    return {"steps": steps, "wall_seconds": round(seconds, 4), "device_activity": "cuda" if cuda else None,
            "self_cpu_ms_total": round(total_cpu / 1e3, 3), "self_cuda_ms_total": round(total_device / 1e3, 3) if cuda else None,
            "by_self_cuda_time": table("self_device_time_total") if cuda else None,
            "by_self_cpu_time": table("self_cpu_time_total"), "device_waits": waits}


def ft_overrides(method: str, size: str, a, extra_steps: int = 0) -> list[str]:
    """The config of one training run: ``--warmup`` + ``--steps`` optimizer steps, plus ``extra_steps``
    (profiled) after them."""
    lr = "1.0e-5" if method == "full" else "2.0e-4"
    steps = a.warmup + a.steps + extra_steps
    return [f"model={PREFIX}{size}", "dtype=bf16", f"ft.tasks=[{a.task}]", f"ft.n_train={steps * a.batch_size}",
            f"ft.batch_size={a.batch_size}", f"ft.per_device_batch_size={a.per_device}", f"ft.method={method}",
            f"ft.learning_rate={lr}", f"ft.max_steps={steps}", "ft.save_steps=0", "ft.logging_steps=1",
            "ft.warmup_steps=0", "ft.lr_scheduler=constant", "ft.epochs=1", *a.extra]


def flops(model_config, n_params: int, method: str, mean_len: float) -> float:
    from bench_train import flops_per_token

    return flops_per_token(model_config, n_params, method, mean_len)


def run_ours(size: str, method: str, data_dir: Path, work: Path, a, profile: bool = False) -> dict:
    import transformers

    from iclvsft.config import load_config
    from iclvsft.plan import CUDA_OVERHEAD, train_memory
    from iclvsft.train import finetune

    extra = a.profile_steps if profile else 0
    config = load_config(None, ft_overrides(method, size, a, extra))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = step_clock()
    profiled: dict = {}
    callbacks = [timer] + ([profiler_callback(a.warmup + a.steps, extra, profiled, a.profile_rows)] if extra else [])
    save = transformers.Trainer.save_model
    transformers.Trainer.save_model = lambda self, *args, **kw: None  # timing only: no weights to disk
    started = time.perf_counter()
    try:
        result = finetune(config, work / f"ours-{size}-{method}", data_dir, callbacks=callbacks, show_progress=False)
    finally:
        transformers.Trainer.save_model = save
    wall = time.perf_counter() - started
    log_rows = [json.loads(x) for x in (work / f"ours-{size}-{method}" / "train_log.jsonl").read_text().splitlines()]
    timed = log_rows[a.warmup:a.warmup + a.steps]
    seconds = sum(timer.wall[a.warmup:a.warmup + a.steps])
    tokens = sum(e["tokens"] for e in timed)
    s = result.summary
    stats = s["tokens_per_epoch"]
    model_config = result.model.config if method == "full" else result.model.base_model.model.config
    n_params = s["model_info"]["n_params"]
    per_token = flops(model_config, n_params, method, stats["mean_row_tokens"])
    ft = config.ft.to_dict()
    rows_per_pass = ft["per_device_batch_size"]
    n_rows = len(result.trainer.train_dataset)
    label_per_row = stats["label_tokens"] / n_rows
    est = train_memory(shape_of(size), method, tokens=rows_per_pass * stats["mean_row_tokens"],
                       logit_positions=rows_per_pass * label_per_row, lora_r=ft["lora"]["r"], half=True,
                       optimizer=ft["optimizer"], accumulation=ft["batch_size"] // rows_per_pass,
                       checkpointing=ft["gradient_checkpointing"], cuda=True)
    out = {"impl": "ours" + (" " + " ".join(a.extra) if a.extra else ""), "size": size, "method": method,
           "batch_size": ft["batch_size"],
           "per_device_batch_size": rows_per_pass, "optimizer": ft["optimizer"], "precision": s["precision"],
           "attn_implementation": s["model_info"].get("attn_implementation"), "params": n_params,
           "trainable_params": s["model_info"].get("trainable_params"), "timed_steps": len(timed),
           "timed_seconds": seconds, "step_seconds": [round(x, 4) for x in timer.wall[:a.warmup + a.steps]],
           "real_tokens": tokens,
           "mean_row_tokens": stats["mean_row_tokens"], "label_tokens_per_row": label_per_row,
           "tokens_per_second": tokens / seconds, "model_flops_per_token": per_token,
           "model_tflops": per_token * tokens / seconds / 1e12, "losses": [e["loss"] for e in log_rows],
           "peak_memory_gib": s["peak_memory_gib"], "plan_estimate_gib": est.device / 2**30,
           "plan_needed_gib": (est.device + CUDA_OVERHEAD) / 2**30,
           "plan_parts_gib": {k: round(v / 2**30, 3) for k, v in est.parts.items()}, "wall_seconds": wall}
    if profile:  # the profiled steps' seconds apart: the profiler slows them
        out["profile"] = {**profiled, "step_seconds": [round(x, 4) for x in timer.wall[a.warmup + a.steps:]]}
    del result
    gc.collect()
    return out


def run_trl(size: str, method: str, data_dir: Path, work: Path, a, checkpointing: bool = False,
            profile: bool = False) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from iclvsft.config import load_config
    from iclvsft.models import count_parameters, load_model
    from iclvsft.train import plan_precision, select_rows, tokenize_rows, training_device

    extra = a.profile_steps if profile else 0
    config = load_config(None, ft_overrides(method, size, a, extra))
    ft = config.ft.to_dict()
    rows, _ = select_rows(data_dir, ft["tasks"], ft["n_train"])
    precision = plan_precision(config, training_device())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loaded = load_model(config.model, dtype=precision.load_dtype)
    n_params = count_parameters(loaded.model)
    _, stats = tokenize_rows(rows, loaded.tokenizer, loss_on="completion", max_length=ft["max_length"])
    if method == "full":
        for p in loaded.model.parameters():
            p.requires_grad_(True)
    lora = ft["lora"]
    args = SFTConfig(output_dir=str(work / f"trl-{size}-{method}"), per_device_train_batch_size=ft["per_device_batch_size"],
                     gradient_accumulation_steps=ft["batch_size"] // ft["per_device_batch_size"],
                     learning_rate=ft["learning_rate"], lr_scheduler_type="constant", max_steps=ft["max_steps"],
                     optim=ft["optimizer"], bf16=precision.bf16, logging_steps=1, save_strategy="no",
                     report_to="none", seed=ft["train_seed"], completion_only_loss=True, padding_free=True,
                     max_length=None, disable_tqdm=True, gradient_checkpointing=checkpointing,
                     use_cpu=not torch.cuda.is_available())
    timer = step_clock()
    profiled: dict = {}
    callbacks = [timer] + ([profiler_callback(a.warmup + a.steps, extra, profiled, a.profile_rows)] if extra else [])
    trainer = SFTTrainer(model=loaded.model, args=args, processing_class=loaded.tokenizer, callbacks=callbacks,
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                          for r in rows]),
                         peft_config=None if method == "full" else LoraConfig(
                             r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    trainer.train()
    seconds = sum(timer.wall[a.warmup:a.warmup + a.steps])
    n_rows = a.steps * ft["batch_size"]
    tokens = n_rows * stats["mean_row_tokens"]  # the same rows as ours
    per_token = flops(loaded.model.config, n_params, method, stats["mean_row_tokens"])
    out = {"impl": "trl" + ("_checkpointing" if checkpointing else ""), "size": size, "method": method,
           "batch_size": ft["batch_size"], "per_device_batch_size": ft["per_device_batch_size"],
           "gradient_checkpointing": checkpointing, "optimizer": ft["optimizer"], "timed_steps": a.steps,
           "timed_seconds": seconds, "step_seconds": [round(x, 4) for x in timer.wall[:a.warmup + a.steps]],
           "real_tokens": tokens,
           "mean_row_tokens": stats["mean_row_tokens"], "tokens_per_second": tokens / seconds,
           "model_flops_per_token": per_token, "model_tflops": per_token * tokens / seconds / 1e12,
           "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
           "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
           "wall_seconds": time.perf_counter() - started}
    if profile:  # the profiled steps' seconds apart: the profiler slows them
        out["profile"] = {**profiled, "step_seconds": [round(x, 4) for x in timer.wall[a.warmup + a.steps:]]}
    del trainer, loaded
    gc.collect()
    return out


def run_eval(size: str, data_dir: Path, a) -> dict:
    from bench_eval import authors_loop, first_line

    from iclvsft.data import load_items
    from iclvsft.evaluate import Evaluator, demo_order, max_new_tokens_for
    from iclvsft.models import load_model
    from iclvsft.plan import eval_memory
    from iclvsft.prompts import build_prompt
    from iclvsft.tasks import get_task

    task = get_task(a.task)
    test = load_items(data_dir, a.task, "test")
    half = a.items // 2
    items = [i for i in test if i.split == "pattern"][:a.items - half] + [i for i in test if i.split != "pattern"][:half]
    train = load_items(data_dir, a.task, "train", split="pattern")
    demos = demo_order(train, 0, a.task, a.shots)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    loaded = load_model(PREFIX + size, dtype="bf16")
    model, tok = loaded.model, loaded.tokenizer
    max_new = max_new_tokens_for(tok, task, [i.answer for i in train])
    prompts = [build_prompt(task, i.question, demos) for i in items]
    n_prompt = sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts)
    out = {"size": size, "items": len(items), "shots": a.shots, "batch_size": a.eval_batch, "max_new_tokens": max_new,
           "mean_prompt_tokens": n_prompt, "dtype": loaded.info["dtype"],
           "attn_implementation": loaded.info["attn_implementation"], "runs": {}}

    def timed(name, fn):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        completions = fn()
        sync()
        secs = time.perf_counter() - t
        out["runs"][name] = {"seconds": secs, "items_per_second": len(items) / secs,
                             "completions": completions, "first_lines": [first_line(c) for c in completions],
                             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
                             if torch.cuda.is_available() else None}
        log(f"eval {size} {name}: {secs:.2f} s ({len(items) / secs:.1f} items/s)")

    ev = Evaluator(model, tok, a.eval_batch, constrained=False)
    ev.run(task, items[:2], demos, max_new)  # warm-up (kernels, allocator)
    timed("engine", lambda: [r["completion"] for r in ev.run(task, items, demos, max_new)])

    def batched_generate():
        res = []
        tok.padding_side = "left"
        for n in range(0, len(prompts), a.eval_batch):
            enc = tok(prompts[n:n + a.eval_batch], return_tensors="pt", padding=True).to(model.device)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
            res += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return res

    authors_loop(model, tok, prompts[:1], max_new)  # warm-up
    timed("generate_batched", batched_generate)
    timed("generate_one_by_one", lambda: authors_loop(model, tok, prompts, max_new))
    ref = out["runs"]["engine"]
    for name, r in out["runs"].items():
        if name == "engine":
            continue
        r["engine_speedup"] = r["seconds"] / ref["seconds"]
        r["identical_first_lines"] = sum(x == y for x, y in zip(ref["first_lines"], r["first_lines"]))
        # the engine stops at end of line, generate runs max_new_tokens: whole strings equal only without a newline
        r["identical_whole_strings"] = sum(x == y for x, y in zip(ref["completions"], r["completions"]))
    n_query = sum(len(tok(build_prompt(task, i.question, []))["input_ids"]) for i in items) / len(items)
    est = eval_memory(shape_of(size), weight_bytes=2, batch=a.eval_batch, context=n_prompt + max_new, query=n_query)
    out["plan_estimate_gib"] = est.device / 2**30
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="0.5b,1.5b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--train", default="0.5b:full,0.5b:lora,1.5b:full,1.5b:lora,7b:lora",
                   help="size:method pairs to train (only those whose size is in --sizes)")
    p.add_argument("--trl", default="all", help="'all', 'none' or size:method pairs also run through TRL")
    p.add_argument("--trl-checkpointing", default="0.5b:lora",
                   help="size:method pairs also run through TRL with its default gradient checkpointing")
    p.add_argument("--eval-sizes", default="0.5b,7b", help="sizes for the engine-vs-generate comparison")
    p.add_argument("--task", default="expression")
    p.add_argument("--batch-size", type=int, default=64, help="rows per optimizer step (both trainers)")
    p.add_argument("--per-device", type=int, default=64, help="rows per forward pass (both trainers)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--items", type=int, default=64, help="evaluation items (half pattern, half control)")
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (datasheet)")
    p.add_argument("--budget", type=float, default=380, help="seconds; stages starting later are skipped")
    p.add_argument("--extra", nargs="*", default=[], help="extra config overrides for both trainers (e.g. ft.logits_on=all)")
    p.add_argument("--profile", action="store_true",
                   help="profile ours and TRL at the first size:method pair (torch.profiler tables in the JSON)")
    p.add_argument("--profile-steps", type=int, default=3, help="optimizer steps profiled, after the timed ones")
    p.add_argument("--profile-rows", type=int, default=20, help="ops per profile table")
    p.add_argument("--no-cudnn-sdp", action="store_true",
                   help="switch off PyTorch's cuDNN attention backend for SDPA (both trainers): the other kernels "
                        "take the packed rows' block mask without planning a cuDNN graph per shape")
    p.add_argument("--out", default="results_gpu.json")
    a = p.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib.metadata as md

    from iclvsft.config import load_config
    from iclvsft.data import generate

    register_random_models()
    if a.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "flash-attn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(a), "versions": versions,
                 "python": sys.version.split()[0], "cuda": torch.version.cuda,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30
                 if torch.cuda.is_available() else None,
                 "peak_tflops_datasheet": a.peak_tflops, "train": [], "eval": [], "errors": [], "skipped": []}

    def save():
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))

    log(f"{res['gpu']} {versions}")
    res["matmul"] = matmul_tflops(a.matmul_n if torch.cuda.is_available() else 512)
    log(f"matmul {res['matmul']}")
    save()
    sizes = a.sizes.split(",")
    pairs = [tuple(x.split(":")) for x in a.train.split(",") if x and x.split(":")[0] in sizes]
    trl = set(pairs) if a.trl == "all" else set() if a.trl == "none" else {tuple(x.split(":")) for x in a.trl.split(",")}
    trl_ckpt = {tuple(x.split(":")) for x in a.trl_checkpointing.split(",") if x}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    data_dir = work / "data"
    n_rows = (a.warmup + a.steps + (a.profile_steps if a.profile else 0)) * a.batch_size
    generate(load_config(None, [f"data.tasks=[{a.task}]", f"data.train_pattern={max(n_rows, 64)}", "data.train_control=0",
                                "data.test_pattern=100", "data.test_control=100"]), data_dir, show_progress=False)
    peak = a.peak_tflops
    jobs, evals = [], [x for x in a.eval_sizes.split(",") if x in sizes]
    for size in sizes:  # by size: training (ours, then TRL), then that size's evaluation
        for s, method in pairs:
            if s == size:
                jobs.append(("ours", size, method))
                if (size, method) in trl:
                    jobs.append(("trl", size, method))
        if size in evals:
            jobs.append(("eval", size, None))
    jobs += [("trl_ckpt", s, m) for s, m in pairs if (s, m) in trl_ckpt]  # TRL's default: last, least needed
    profiled = pairs[0] if a.profile and pairs and a.profile_steps > 0 else None  # the first size:method pair
    for kind, size, method in jobs:
        if time.perf_counter() - T0 > a.budget:
            res["skipped"].append(f"{kind} {size} {method or ''}: over the time budget")
            log(f"skipped {kind} {size} {method}")
            continue
        try:
            if kind == "eval":
                r = run_eval(size, data_dir, a)
                res["eval"].append(r)
            else:
                profile = (size, method) == profiled and kind in ("ours", "trl")
                r = (run_ours(size, method, data_dir, work, a, profile=profile) if kind == "ours" else
                     run_trl(size, method, data_dir, work, a, checkpointing=kind == "trl_ckpt", profile=profile))
                r["mfu_vs_datasheet"] = r["model_tflops"] / peak
                r["mfu_vs_matmul"] = r["model_tflops"] / res["matmul"]["tflops"]
                res["train"].append(r)
                log(f"{kind} {size} {method}: {r['tokens_per_second']:.0f} tok/s, {r['model_tflops']:.1f} TFLOP/s, "
                    f"MFU {100 * r['mfu_vs_datasheet']:.1f}% of {peak:.0f}, peak {r['peak_memory_gib']} GiB"
                    + (f", plan {r['plan_estimate_gib']:.2f} GiB" if "plan_estimate_gib" in r else ""))
        except Exception as error:  # keep going: one failure must not cost the other figures
            import traceback

            traceback.print_exc()
            res["errors"].append(f"{kind} {size} {method or ''}: {type(error).__name__}: {str(error)[:500]}")
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        save()
    for r in res["train"]:
        if r["impl"].startswith("trl"):
            ours = next((o for o in res["train"] if o["impl"] == "ours" and o["size"] == r["size"]
                         and o["method"] == r["method"]), None)
            if ours:
                r["ours_speedup"] = ours["tokens_per_second"] / r["tokens_per_second"]
    res["total_seconds"] = time.perf_counter() - T0
    save()
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
