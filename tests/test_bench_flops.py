"""benchmarks/bench_eval.py's FLOP count of the ICL engine, against counts worked out by hand."""
import sys

import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_eval import ForwardFlops  # noqa: E402


def test_forward_flops_by_hand(tiny):
    """The tiny model: 2 layers, hidden 64, 4 heads of 16 (d_attn 64), vocabulary 258, untied output layer,
    107,328 parameters. Matmul weights: all but the input embedding (258 x 64 = 16,512), so 90,816, of
    which the output layer 16,512 and the body 74,304."""
    model = tiny.model
    counter = ForwardFlops(model)
    try:
        with torch.no_grad():
            # [2, 5], no cache, every position's logits: 2 * 74,304 * 10 + 2 * 16,512 * 10
            # + attention 4 * 2 layers * 64 * 2 rows * (1 + 2 + 3 + 4 + 5) = 1,486,080 + 330,240 + 15,360
            model(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))
            assert counter.flops == 1_831_680 and counter.tokens == 10 and counter.calls == 1
            # a prefix of 7 tokens, last logits only: 2 * 74,304 * 7 + 2 * 16,512 + 4 * 2 * 64 * 28
            ids = torch.ones(1, 7, dtype=torch.long)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            assert counter.flops - 1_831_680 == 1_087_616
            # 3 rows of 4 tokens over that cache (mask width 11), last logits only: 2 * 74,304 * 12
            # + 2 * 16,512 * 3 + 4 * 2 * 64 * 3 rows * (4 x 7 cached + 1 + 2 + 3 + 4)
            out.cache.batch_repeat_interleave(3)
            model(input_ids=torch.ones(3, 4, dtype=torch.long), attention_mask=torch.ones(3, 11, dtype=torch.long),
                  cache=out.cache, use_cache=True, logits_to_keep=1)
            assert counter.flops - 1_831_680 - 1_087_616 == 1_940_736
            assert counter.tokens == 10 + 7 + 12 and counter.calls == 3
    finally:
        counter.handle.remove()
