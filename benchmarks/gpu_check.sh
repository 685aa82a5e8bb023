#!/usr/bin/env bash
# The GPU check (run on a lent GPU machine; see benchmarks/README.md, "On a GPU"): the real scripts
# on CUDA with the tiny model (full FT under bf16 autocast, LoRA, evaluation compared with the CPU),
# then peak memory and step time per model size (bench_memory.py). Writes bench_memory.json to $OUT
# (or the current folder). Needs the pinned transformers/peft importable (e.g. wheels on PYTHONPATH).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys,torch,transformers,peft,accelerate;print(sys.version.split()[0],torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,torch.cuda.is_available())"
S="data.train_pattern=64 data.train_control=16 data.test_pattern=16 data.test_control=16"
python3 generate_data.py $S --out /tmp/d --quiet || exit 1
echo "== full FT, bf16 on CUDA"; time python3 finetune.py ft.max_steps=6 dtype=bf16 --model tiny-random-qwen2 --task expression --n-train 32 --method full --data /tmp/d --out /tmp/ft-full --quiet 2>&1 | grep -v Warning | tail -4
echo "== LoRA, bf16 on CUDA"; time python3 finetune.py ft.max_steps=6 dtype=bf16 --model tiny-random-qwen2 --task expression --n-train 32 --method lora --data /tmp/d --out /tmp/ft-lora --quiet 2>&1 | grep -v Warning | tail -4
python3 -c "import json;[print(p, {k:json.load(open(p+'/summary.json'))[k] for k in ('device','precision','final_loss','steps')}, json.load(open(p+'/summary.json'))['model_info'].get('attn_implementation')) for p in ('/tmp/ft-full','/tmp/ft-lora')]"
echo "== evaluation, CUDA vs CPU (tiny model, fp32, LoRA adapter and base)"
for dev in gpu cpu; do
  if [ $dev = cpu ]; then export CUDA_VISIBLE_DEVICES=; fi
  python3 test.py --model tiny-random-qwen2 --adapter /tmp/ft-lora --data /tmp/d --tasks expression,relation --shots 0,2 --demo-seeds 0 --out /tmp/ev-$dev --quiet > /dev/null 2>&1 || echo "test.py failed on $dev"
  python3 test.py --model /tmp/ft-full --data /tmp/d --tasks expression --shots 0 --out /tmp/evfull-$dev --quiet > /dev/null 2>&1 || echo "test.py (full) failed on $dev"
done
unset CUDA_VISIBLE_DEVICES
python3 - <<'PY'
import json
for a, b in (("/tmp/ev-gpu", "/tmp/ev-cpu"), ("/tmp/evfull-gpu", "/tmp/evfull-cpu")):
    try:
        ra = [json.loads(l) for l in open(a + "/samples.jsonl")]; rb = [json.loads(l) for l in open(b + "/samples.jsonl")]
        same = sum(x["completion"] == y["completion"] for x, y in zip(ra, rb))
        print(a, "vs", b, f"{same}/{len(ra)} identical completions;", json.load(open(a + "/run.json"))["model_info"].get("device"))
    except Exception as e:
        print(a, "comparison failed:", e)
PY
echo "== memory and step time per size (random weights, batch 4 x 128 tokens, bf16)"
timeout 200 python3 benchmarks/bench_memory.py --sizes 0.5b,1.5b,7b --methods lora,full --out ${OUT:-.}/bench_memory.json
