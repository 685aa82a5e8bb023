"""Importing iclvsft turns on PyTorch's transparent huge pages for large CPU tensors (iclvsft/__init__.py),
unless the user set THP_MEM_ALLOC_ENABLE; the allocator really uses them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = """
import iclvsft, os, torch
x = torch.zeros(151936, 896)  # the 0.5B model's input-embedding gradient: 545 MB
huge = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge // 1024)
"""


def probe(**env_extra):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env_extra
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    setting, huge_mib = out.stdout.split()
    return setting, int(huge_mib)


@pytest.mark.skipif(not MODE.is_file() or "[madvise]" not in MODE.read_text(),
                    reason="the kernel's transparent huge pages are not in madvise mode (always or never: torch's "
                           "setting changes nothing)")
def test_large_tensors_get_huge_pages_unless_the_user_says_no():
    setting, huge_mib = probe()
    assert setting == "1" and huge_mib >= 512  # the 545 MB tensor sits in 2 MB pages
    setting, huge_mib = probe(THP_MEM_ALLOC_ENABLE="0")
    assert setting == "0" and huge_mib < 64  # the user's choice is kept
