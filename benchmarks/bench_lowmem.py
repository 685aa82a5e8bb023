#!/usr/bin/env python
"""Full fine-tuning in low precision on the CPU: loss curves, peak memory and step time.

Setups (each through :func:`iclvsft.train.finetune`, full FT, bf16 compute, same rows, seed and order;
each in a fresh process, one after another, so peak memory is the setup's own):

* ``fp32``:       the default: fp32 master weights and gradients, torch's fused AdamW, fp32 moments;
* ``8bit``:       fp32 master weights and gradients, torchao's 8-bit AdamW (``ft.optimizer=adamw_torch_8bit``);
* ``8bit_bf16``:  bf16 weights and gradients, torchao's 8-bit AdamW with bf16 stochastic rounding
                  (``ft.param_dtype=bf16``);
* ``4bit_bf16``:  the same with 4-bit moments (``adamw_torch_4bit``).

Each run trains ``--steps`` optimizer steps of ``--rows`` rows of ``--task`` (``--rows`` = the batch, so
every step sees the same rows: ``ft.n_train = ft.batch_size = ft.per_device_batch_size``; with
``--n-train`` above ``--rows`` each step takes rows not yet seen, in the train seed's order), lr
``--lr`` constant, no warm-up, the loss on the answer (configs/cpu.yaml otherwise). Recorded: the
loss at every step (train_log.jsonl), seconds per step (the first one includes torchao's compilation
of its update kernels, so the median of the others is reported), the peak resident memory of the
process while it trains (sampled every 10 ms from the Trainer's first step to its last) and over the
whole process (``ru_maxrss``: loading included), and the plan's estimate for the same shape
(:func:`iclvsft.plan.train_memory` + the plan's CPU process overhead). Against the reference setup
(the first of ``--setups``): the relative difference of the final loss and of the mean loss.

    python generate_data.py --out /tmp/h2data --quiet data.tasks=[expression] data.train_pattern=64 \\
        data.train_control=0 data.test_pattern=8 data.test_control=8
    python benchmarks/bench_lowmem.py --model qwen2.5-coder-0.5b-instruct --data /tmp/h2data --steps 32 \\
        --setups fp32,8bit,8bit_bf16,4bit_bf16 --out benchmarks/results_lowmem_0.5b.json
    python benchmarks/bench_lowmem.py --model qwen2.5-coder-1.5b-instruct --data /tmp/h2data --steps 4 \\
        --setups 8bit_bf16 --out benchmarks/results_lowmem_1.5b.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETUPS = {
    "fp32": [],
    "8bit": ["ft.optimizer=adamw_torch_8bit"],
    "8bit_bf16": ["ft.optimizer=adamw_torch_8bit", "ft.param_dtype=bf16"],
    "4bit_bf16": ["ft.optimizer=adamw_torch_4bit", "ft.param_dtype=bf16"],
    "fp32_seed1": ["ft.train_seed=1"],  # the default with the rows in another order: a noise reference
}
GIB = 2**30


def rss_sampler():
    """A Trainer callback that samples the process's resident memory from the first step to the end."""
    import psutil
    from transformers import TrainerCallback

    class Sampler(TrainerCallback):
        def __init__(self):
            self.peak, self.at_begin, self._stop = 0, 0, threading.Event()
            self._proc = psutil.Process()

        def _run(self):
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss)
                self._stop.wait(0.01)

        def on_train_begin(self, args, state, control, **kwargs):
            self.at_begin = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

        def on_train_end(self, args, state, control, **kwargs):
            self._stop.set()
            self._thread.join()

    return Sampler()


def child(args) -> dict:
    """One setup in this process: train, then report what was measured (JSON on stdout's last line)."""
    from iclvsft.config import load_config
    from iclvsft.plan import CPU_OVERHEAD, model_shape, param_bytes, train_memory
    from iclvsft.train import finetune

    overrides = [f"model={args.model}", "dtype=bf16", "ft.method=full", f"ft.tasks=[{args.task}]",
                 f"ft.n_train={args.n_train or args.rows}", f"ft.batch_size={args.rows}", f"ft.per_device_batch_size={args.rows}",
                 f"ft.max_steps={args.steps}", f"ft.learning_rate={args.lr}", "ft.lr_scheduler=constant",
                 "ft.warmup_steps=0", "ft.save_steps=0", "ft.logging_steps=1", *SETUPS[args.child]]
    config = load_config(str(ROOT / "configs" / "cpu.yaml"), overrides)
    sampler = rss_sampler()
    out = Path(args.workdir) / args.child
    result = finetune(config, out, args.data, callbacks=[sampler], show_progress=False, overwrite=True)
    log = read_log(out)
    for weights in out.glob("*.safetensors"):  # the trained model is not needed: free the disk
        weights.unlink()
    summary = result.summary
    stats = summary["tokens_per_epoch"]
    shape = model_shape(args.model)
    ft = config.ft
    per_step = args.rows / (args.n_train or args.rows)  # the stats count an epoch of n_train rows
    est = train_memory(shape, "full", tokens=stats["tokens"] * per_step, logit_positions=stats["label_tokens"] * per_step,
                       half=True,
                       optimizer=ft.optimizer, accumulation=1, cuda=False, param_bytes=param_bytes(ft))
    seconds = [e["seconds"] for e in log]
    return {"setup": args.child, "overrides": SETUPS[args.child], "model": args.model,
            "params": summary["model_info"]["trainable_params"], "rows": args.rows, "n_train": args.n_train or args.rows,
            "steps": len(log),
            "tokens_per_step": stats["tokens"] * per_step, "label_tokens_per_step": stats["label_tokens"] * per_step,
            "losses": [e["loss"] for e in log], "seconds": seconds,
            "seconds_first_step": seconds[0], "seconds_per_step": statistics.median(seconds[1:] or seconds),
            "peak_rss_train_gib": sampler.peak / GIB, "rss_at_train_begin_gib": sampler.at_begin / GIB,
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "plan_estimate_gib": est.device / GIB, "plan_needed_gib": (est.device + CPU_OVERHEAD) / GIB,
            "plan_parts_gib": {k: round(v / GIB, 3) for k, v in est.parts.items()},
            "plan_shape_params": shape.params, "precision": summary["precision"],
            "threads": __import__("torch").get_num_threads(),
            "train_seconds": summary["train_seconds"], "wall_seconds": summary["wall_seconds"]}


def read_log(out: Path) -> list[dict]:
    path = out / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def compare(runs: list[dict]) -> dict:
    """Each setup against the first: relative difference of the final and the mean loss, and the largest
    per-step relative difference."""
    ref = runs[0]
    out = {}
    for run in runs[1:]:
        a, b = ref["losses"], run["losses"]
        n = min(len(a), len(b))
        out[run["setup"]] = {
            "final_rel": (b[n - 1] - a[n - 1]) / a[n - 1],
            "mean_rel": (sum(b[:n]) / n - sum(a[:n]) / n) / (sum(a[:n]) / n),
            "max_step_rel": max(abs(y - x) / x for x, y in zip(a[:n], b[:n])),
        }
    return out


def write_results(args, runs: list[dict]) -> dict:
    """The results so far (``--out``): every run, and each complete one against the first if it completed."""
    done = [r for r in runs if "error" not in r]
    against = compare(done) if len(done) > 1 and done[0]["setup"] == runs[0]["setup"] else {}
    result = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "runs": runs, "against_first": against}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_setup(args, name: str, workdir: Path, left: float | None) -> dict:
    """One setup in a child process (killed when ``left`` seconds have passed: its logged steps are kept)."""
    started = time.time()
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--data", args.data, "--task",
           args.task, "--rows", str(args.rows), "--n-train", str(args.n_train), "--steps", str(args.steps), "--lr", str(args.lr),
           "--workdir", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=left)
    except subprocess.TimeoutExpired:
        log = read_log(workdir / name)
        print(f"{name}: stopped at the deadline, {len(log)} steps logged", file=sys.stderr)
        return {"setup": name, "error": f"stopped at the deadline after {time.time() - started:.0f} s",
                "losses": [e["loss"] for e in log], "seconds": [e["seconds"] for e in log]}
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        print(f"{name}: failed ({last})", file=sys.stderr)
        return {"setup": name, "error": last, "returncode": proc.returncode}
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    run["load_average_after"] = os.getloadavg()
    print(f"{name}: {time.time() - started:.0f} s; loss {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}; "
          f"{run['seconds_per_step']:.2f} s/step (first {run['seconds_first_step']:.1f} s); peak RSS training "
          f"{run['peak_rss_train_gib']:.2f} GiB (process {run['ru_maxrss_gib']:.2f}); plan "
          f"{run['plan_needed_gib']:.2f} GiB", file=sys.stderr)
    print("  losses: " + " ".join(f"{x:.4f}" for x in run["losses"]), file=sys.stderr)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data", default="data")
    parser.add_argument("--task", default="expression")
    parser.add_argument("--rows", type=int, default=16, help="rows per step (= ft.n_train: the same rows every step)")
    parser.add_argument("--n-train", type=int, default=0, help="rows trained on (0: --rows, the same rows every "
                        "step; more: fresh rows each step until they run out, so each step's loss is on rows not yet seen)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.0e-5, help="constant learning rate (the authors' full FT: 1e-5)")
    parser.add_argument("--setups", default="fp32,8bit,8bit_bf16", help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after each setup)")
    parser.add_argument("--workdir", default=None, help="the runs' folders (default: a temporary folder)")
    parser.add_argument("--deadline", default=None, help="HH:MM (UTC): a setup still running then is stopped "
                        "(its logged steps are kept) and no further one starts")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    names = args.setups.split(",")
    for name in names:
        if name not in SETUPS:
            parser.error(f"unknown setup {name!r}; use {', '.join(SETUPS)}")
    deadline = None
    if args.deadline:
        hour, minute = map(int, args.deadline.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        deadline = now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lowmem_"))
    runs: list[dict] = []
    for name in names:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < 60:
            runs.append({"setup": name, "error": "not run: the deadline had come"})
        else:
            runs.append(run_setup(args, name, workdir, left))
        write_results(args, runs)
    result = write_results(args, runs)
    for name, diff in result["against_first"].items():
        print(f"{name} vs {runs[0]['setup']}: final loss {diff['final_rel']:+.2%}, mean loss {diff['mean_rel']:+.2%}, "
              f"largest step {diff['max_step_rel']:.2%}", file=sys.stderr)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
