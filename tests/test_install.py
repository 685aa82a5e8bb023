"""What `pip install` puts on a CPU machine: the one-command CPU install (requirements-cpu.txt) pins the
locked torch from PyTorch's CPU index, and the locked runtime packages stay under 3 GB installed."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 3 * 10**9


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def test_cpu_install_pins_the_locked_torch_from_the_cpu_index():
    text = (ROOT / "requirements-cpu.txt").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines and lines[-1] == "."
    locked = _pins(ROOT / "requirements.txt")["torch"]
    assert f'torch=={locked}+cpu ; sys_platform == "linux"' in lines  # the lock's version, CPU build
    assert f'torch=={locked} ; sys_platform != "linux"' in lines


def test_locked_runtime_install_stays_under_3_gb():
    """The installed size of every runtime package of the lock (requirements.txt: what `pip install .` with
    the lock puts in a venv), summed from each distribution's own file list, on this CPU machine."""
    assert torch.version.cuda is None, "this check is about the CPU build; on a CUDA build the size is several GB"
    total, sizes = 0, {}
    for name in _pins(ROOT / "requirements.txt"):
        dist = importlib.metadata.distribution(name)
        size = sum(f.size or 0 for f in dist.files or [])
        sizes[name] = size
        total += size
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    print(f"\nlocked runtime packages installed: {total / 1e9:.2f} GB; largest: "
          + ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in biggest))
    assert sizes["torch"] > 100e6  # the sizes are real (a RECORD without sizes would pass any limit)
    assert total < LIMIT_BYTES, f"{total / 1e9:.2f} GB installed, over the 3 GB a CPU machine should need"
