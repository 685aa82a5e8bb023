"""The machine a plan is checked against: this one (detected) or a stated one."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..io import host_ram_bytes
from .shapes import GIB


@dataclass(frozen=True)
class Machine:
    gpus: int  # 0: no GPU, runs use the CPU and host RAM
    gpu_bytes: float  # memory of each GPU
    host_bytes: float
    label: str

    @property
    def cuda(self) -> bool:
        return self.gpus > 0


def detect_machine(gpus: int | None = None, gpu_gib: float | None = None, host_gib: float | None = None) -> Machine:
    """This machine (CUDA devices and the free memory ``torch.cuda.mem_get_info`` reports, host RAM),
    with any of its numbers replaced by a stated one (``--plan-gpus``, ``--plan-gpu-gib``,
    ``--plan-host-gib``)."""
    import torch

    host = host_gib * GIB if host_gib is not None else host_ram_bytes()
    host_label = f"host RAM {host / GIB:.0f} GiB" + (" (stated)" if host_gib is not None else " (total, detected)")
    detected = torch.cuda.is_available()
    if gpus is None and gpu_gib is None:
        if not detected:
            return Machine(0, 0.0, host, f"no CUDA device: runs use the CPU and {host_label}")
        n = torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info(0)
        try:
            name = torch.cuda.get_device_name(0)
        except Exception:  # a faked or odd device
            name = "CUDA device"
        return Machine(n, float(free), host, f"{n} x {name}, {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB "
                                            f"(detected), {host_label}")
    n = 1 if gpus is None else int(gpus)
    if n < 0:
        raise ConfigError(f"--plan-gpus must be >= 0, got {n}")
    if n == 0:
        return Machine(0, 0.0, host, f"no GPU (stated): runs use the CPU and {host_label}")
    if gpu_gib is None:
        if not detected:
            raise ConfigError("--plan-gpus needs --plan-gpu-gib here: this machine has no CUDA device to read "
                              "the memory from (e.g. --plan-gpus 8 --plan-gpu-gib 80)")
        gpu_bytes, how = float(torch.cuda.mem_get_info(0)[0]), "free, detected"
    else:
        if gpu_gib <= 0:
            raise ConfigError(f"--plan-gpu-gib must be > 0, got {gpu_gib}")
        gpu_bytes, how = gpu_gib * GIB, "stated"
    return Machine(n, gpu_bytes, host, f"{n} x GPU with {gpu_bytes / GIB:.0f} GiB ({how}), {host_label}")


