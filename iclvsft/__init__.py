"""iclvsft: in-context learning vs fine-tuning on implicit-pattern tasks (Yin et al., EMNLP 2024 Findings)."""
import os

__version__ = "0.2.0"  # bump whenever a generator's output changes: data folders of another version are refused

# PyTorch's CPU allocator backs large tensors (2 MB and up) with transparent huge pages when this is set.
# Without it every large temporary (autocast's bf16 copies of the weights, the input embedding's dense
# gradient: 151,936 x 896 floats filled with zeros each step) is fresh memory the kernel faults in 4 KB at a
# time; with huge pages those operators took ~1.6 s less in a profiled ~8.5 s full-FT step of the 0.5B model,
# and full FT ran 14% faster (benchmarks/README.md, "Huge pages"). Allocation only: every value computed is
# the same. torch reads it at its first large allocation, so it is set here, on import, before any model is
# built; a value the user set is kept (THP_MEM_ALLOC_ENABLE=0 turns it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
