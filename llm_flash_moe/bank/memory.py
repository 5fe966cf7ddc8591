"""How much memory this machine has, and how much of it the expert bank may take.

The bank lives where the kernels read it: GPU memory on CUDA, unified memory on Apple Silicon, RAM on
the CPU backend. Its default budget is what that memory has free once the model is loaded, less a
reserve for the operating system, other programs and the KV cache's growth (``reserve_bytes``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

GB = 1e9
RESERVE_SHARE = 0.15  # of the memory the bank lives in: the OS, other programs, the KV cache's growth
RESERVE_MIN = 2 * GB


def total_memory() -> Optional[int]:
    """Bytes of physical memory of this machine (the cgroup's limit if lower), or None when unknown."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        try:  # macOS
            total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                       timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    limit = cgroup_limit()
    if limit is not None and (total is None or limit < total):
        return limit
    return total


def cgroup_limit() -> Optional[int]:
    """This process's cgroup v2 ``memory.max``, or None when there is none (or no cgroup v2)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            line = next((l for l in f if l.startswith("0::")), None)
        if line is None:
            return None
        path = "/sys/fs/cgroup" + line.strip()[3:]
        with open(os.path.join(path, "memory.max")) as f:
            value = f.read().strip()
        return None if value == "max" else int(value)
    except (OSError, ValueError):
        return None


def available_memory() -> Optional[int]:
    """Bytes of RAM a new allocation can take without pushing anything else out (page cache counts as free)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.split()}
            available = info["MemAvailable"]
        except (OSError, KeyError, ValueError, IndexError):
            return None
        limit = cgroup_limit()
        if limit is not None:
            try:
                with open("/sys/fs/cgroup" + _own_cgroup() + "/memory.current") as f:
                    used = int(f.read())
                available = min(available, max(0, limit - used))
            except (OSError, ValueError):
                pass
        return available
    total = total_memory()
    if total is None:
        return None
    try:  # macOS: free + inactive + purgeable pages
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        page = int(out.split("page size of")[1].split()[0])
        pages = {l.split(":")[0].strip(): int(l.split(":")[1].strip().rstrip(".")) for l in out.splitlines()[1:]
                 if ":" in l and l.split(":")[1].strip().rstrip(".").isdigit()}
        free = sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive", "Pages purgeable", "Pages speculative"))
        return free * page
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return total // 2


def _own_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        return next(l for l in f if l.startswith("0::")).strip()[3:]


def gpu_memory() -> Optional[tuple]:
    """(free, total) bytes of the CUDA device MLX uses, or None."""
    from .cuda_memory import memory_info

    return memory_info()


def bank_memory():
    """(free, total) bytes of the memory the bank lives in on the current MLX backend, or (None, None)."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available():
        info = gpu_memory()
        return info if info is not None else (None, None)
    total = total_memory()
    free = available_memory()
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        try:  # what Metal lets one process keep resident
            limit = int(mx.device_info()["max_recommended_working_set_size"])
            free = min(free, limit - mx.get_active_memory()) if free is not None else limit - mx.get_active_memory()
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
    return free, total


def reserve_bytes(total: Optional[int]) -> int:
    """Memory left to the OS, other programs and the KV cache's growth when the bank sizes itself."""
    return int(max(RESERVE_MIN, RESERVE_SHARE * (total or 0)))


def bank_room(free: int, total: Optional[int], held: int = 0, weights: int = 0) -> int:
    """Bytes the bank may take: ``free`` memory where it lives plus the bank it would replace (``held``),
    less the reserve and the resident ``weights`` still to be loaded."""
    return max(0, int(free + held - reserve_bytes(total) - weights))
