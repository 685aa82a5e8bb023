import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The tests run tiny models whose matrix products take microseconds: with several threads the
# OpenMP hand-offs cost far more than the work (seen here: 5 s vs 0.06 s for the same evaluation
# when another process shares the 2 cores). One thread, here and in every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
