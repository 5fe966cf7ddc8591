"""MLX's CUDA backend keeps arrays in CUDA managed memory. When the CPU writes expert records into
them (our reads), the GPU's first touch migrates the pages one fault at a time (~2.8 GB/s measured on
an H100). Advising the buffers to live in host memory and be accessed by the GPU lets the GPU read
them across the bus instead (~30 GB/s measured): benchmarks/cuda_transfer.py and docs/PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

_SET_PREFERRED_LOCATION, _SET_ACCESSED_BY = 3, 5
_LOCATION_DEVICE, _LOCATION_HOST = 1, 2


class _Location(ctypes.Structure):  # cudaMemLocation (CUDA 13)
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


@lru_cache(maxsize=None)
def _cudart():
    for name in (ctypes.util.find_library("cudart"), "libcudart.so.13", "libcudart.so"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def keep_on_host_for_gpu(address: int, nbytes: int, device: int = 0) -> bool:
    """Advise a managed range to stay in host memory, mapped for the GPU. False when not possible."""
    lib = _cudart()
    if lib is None:
        return False
    ptr, size = ctypes.c_void_p(address), ctypes.c_size_t(nbytes)
    ok = lib.cudaMemAdvise(ptr, size, ctypes.c_int(_SET_PREFERRED_LOCATION), _Location(_LOCATION_HOST, 0)) == 0
    return ok and lib.cudaMemAdvise(ptr, size, ctypes.c_int(_SET_ACCESSED_BY), _Location(_LOCATION_DEVICE, device)) == 0
