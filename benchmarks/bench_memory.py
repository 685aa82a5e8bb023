#!/usr/bin/env python
"""Peak memory and step time of one fine-tuning step, per model size and method, on random weights.

The paper's sizes need no download: a Qwen2.5 architecture built from its config with random
weights has the parameters, activations and optimizer state of the real model, which is all that
memory and speed depend on. The precision follows ``iclvsft.train``: LoRA keeps the frozen base in
the training dtype and the adapter in fp32; full FT keeps fp32 master weights and runs under autocast.
The optimizer is torch AdamW (the Trainer's ``adamw_torch``). Measures, after ``--steps`` steps of
``--batch`` rows x ``--tokens`` tokens: peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS)
and the mean step time of the steps after the first.

    python benchmarks/bench_memory.py --sizes 0.5b,1.5b --methods lora,full --out results/bench_memory.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from iclvsft.io import provenance, write_json  # noqa: E402
from iclvsft.models import count_parameters, peak_memory_bytes  # noqa: E402

# Qwen2.5-Instruct architectures (the models' config.json); "tiny" is for trying the script on a CPU.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def one(size: str, method: str, device: torch.device, dtype: torch.dtype, batch: int, tokens: int, steps: int,
        checkpointing: bool) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[size], max_position_embeddings=4096, attn_implementation="sdpa")
    load_dtype = dtype if method == "lora" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=load_dtype)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
    autocast = dtype != torch.float32 and method == "full"
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    out = {"size": size, "method": method, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
           "batch": batch, "tokens": tokens, "gradient_checkpointing": checkpointing,
           "params": count_parameters(model), "trainable_params": count_parameters(model, trainable_only=True),
           "peak_gib": round(peak_memory_bytes(device) / 2**30, 3),
           "step_seconds": round(sum(times[1:]) / max(len(times) - 1, 1), 4), "loss": round(loss.item(), 4)}
    out["peak_bytes_per_param"] = round(peak_memory_bytes(device) / out["params"], 2)
    del model, optimizer, params
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="tiny", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="training precision")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--tokens", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (the first is not timed)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            try:
                row = one(size, method, device, dtype, args.batch, args.tokens, args.steps,
                          args.gradient_checkpointing)
            except torch.OutOfMemoryError as error:
                row = {"size": size, "method": method, "error": f"out of memory: {str(error)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, {"rows": rows, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                              "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
