"""fp16 with dynamic loss scaling against bf16 and fp32 on this CPU: one full-FT training step of SmolLM2-135M
(2 rows x 64 tokens, one thread), each precision in turn, three rounds; prints each step's seconds and the
fastest of each, with the fp16/bf16 ratio (docs/ladder.md: the ladder trains bf16 because fp16 costs 9-18x).

    .venv/bin/python benchmarks/bench_fp16.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from iclvsft.models import load_model  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)
model = load_model("smollm2-135m-instruct", dtype="fp32").model
model.train()
ids = torch.randint(100, 20000, (2, 64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
scaler = torch.amp.GradScaler("cpu")


def step(dtype, scale) -> float:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    if scale:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


seconds: dict[str, list[float]] = {}
for _ in range(3):
    for name, dtype, scale in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, True),
                               ("fp32", torch.float32, False)):
        start = time.perf_counter()
        loss = step(dtype, scale)
        seconds.setdefault(name, []).append(time.perf_counter() - start)
        print(f"{name} {seconds[name][-1]:.2f} s (loss {loss:.3f})", flush=True)
best = {name: min(v) for name, v in seconds.items()}
print({name: round(v, 2) for name, v in best.items()}, f"fp16/bf16 {best['fp16'] / best['bf16']:.1f}x")
