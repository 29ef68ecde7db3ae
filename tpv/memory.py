"""How much memory is free for a trial: light on imports (torch only for a GPU), because the grid measures it in a
Ray task on a node trials run on, and a task that imported torch to read /proc/meminfo would cost seconds."""

from __future__ import annotations

import os


def free_memory_bytes(device: str) -> int:
    """Memory free for a trial on `device`: the GPU's free memory ("cuda"), else the machine's available memory."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
