"""What a benchmark record says about where it ran: hardware, git commit, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

from .cells import REPO_ROOT

__all__ = ["hardware_string", "git_commit", "peak_memory"]


def hardware_string(device: str = "cpu") -> str:
    """CPU model, logical cores, torch threads and version, device (GPU name when CUDA)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return text


def git_commit() -> str | None:
    """``HEAD``'s hash (``+dirty`` when the working tree has changes), or ``None`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process (MiB) and peak CUDA memory allocated (MiB, ``None`` without CUDA)."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}

