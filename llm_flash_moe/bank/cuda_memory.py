"""Moving expert records into GPU memory on MLX's CUDA backend.

MLX's CUDA arrays are CUDA managed memory. Two ways of getting records the CPU read into them are
implemented here (measured in benchmarks/cuda_transfer.py, figures in docs/PERFORMANCE.md):

- ``keep_on_host_for_gpu``: advise the buffers to live in host memory, mapped for the GPU, and read
  straight into them; the GPU then reads the records across the bus each time it uses them (without
  the advice its first touch migrates the pages one fault at a time, ~2.8 GB/s on an H100).
- ``DeviceCopies``: read into pinned host staging buffers, then DMA each record into buffers advised to
  live in GPU memory with ``cudaMemcpyAsync`` on a per-thread stream; the copy runs on the copy engines,
  beside whatever the GPU is computing, and the kernels read GPU memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from functools import lru_cache

_SET_PREFERRED_LOCATION, _SET_ACCESSED_BY = 3, 5
_LOCATION_DEVICE, _LOCATION_HOST = 1, 2
_MEMCPY_DEFAULT = 4  # the runtime infers the direction from the (unified) addresses
_STREAM_NON_BLOCKING = 1


class _Location(ctypes.Structure):  # cudaMemLocation (CUDA 13)
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


@lru_cache(maxsize=None)
def _cudart():
    candidates = [ctypes.util.find_library("cudart"), "libcudart.so.13", "libcudart.so"]
    for root in sys.path:  # the nvidia-cuda-runtime wheel MLX's CUDA build depends on
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libcudart.so*")))
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    for name in candidates:
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def _advise(address: int, nbytes: int, preferred: int, device: int) -> bool:
    lib = _cudart()
    if lib is None:
        return False
    ptr, size = ctypes.c_void_p(address), ctypes.c_size_t(nbytes)
    ok = lib.cudaMemAdvise(ptr, size, ctypes.c_int(_SET_PREFERRED_LOCATION), _Location(preferred, device)) == 0
    return ok and lib.cudaMemAdvise(ptr, size, ctypes.c_int(_SET_ACCESSED_BY), _Location(_LOCATION_DEVICE, device)) == 0


def keep_on_host_for_gpu(address: int, nbytes: int, device: int = 0) -> bool:
    """Advise a managed range to stay in host memory, mapped for the GPU. False when not possible."""
    return _advise(address, nbytes, _LOCATION_HOST, device)


def keep_on_device(address: int, nbytes: int, device: int = 0) -> bool:
    """Advise a managed range to stay in GPU memory. False when not possible."""
    return _advise(address, nbytes, _LOCATION_DEVICE, device)


class DeviceCopies:
    """Asynchronous host -> GPU copies from pinned staging memory, one CUDA stream per calling thread."""

    def __init__(self):
        self.lib = _cudart()
        if self.lib is None:
            raise RuntimeError("the CUDA runtime library (libcudart) was not found")
        self._local = threading.local()

    def pin(self, address: int, nbytes: int) -> None:
        """Page-lock host memory so the copy engines can read it (cudaHostRegister)."""
        status = self.lib.cudaHostRegister(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), ctypes.c_uint(0))
        if status != 0:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {status}")

    def unpin(self, address: int) -> None:
        self.lib.cudaHostUnregister(ctypes.c_void_p(address))

    def _stream(self) -> ctypes.c_void_p:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = ctypes.c_void_p()
            status = self.lib.cudaStreamCreateWithFlags(ctypes.byref(stream), ctypes.c_uint(_STREAM_NON_BLOCKING))
            if status != 0:
                raise RuntimeError(f"cudaStreamCreateWithFlags failed with CUDA error {status}")
            self._local.stream = stream
        return stream

    def copy(self, pairs) -> None:
        """Copy each ``(destination, source, nbytes)`` and return once all have landed."""
        stream = self._stream()
        for dst, src, nbytes in pairs:
            status = self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                              ctypes.c_int(_MEMCPY_DEFAULT), stream)
            if status != 0:
                raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {status}")
        status = self.lib.cudaStreamSynchronize(stream)
        if status != 0:
            raise RuntimeError(f"cudaStreamSynchronize failed with CUDA error {status}")


def memory_info():
    """(free, total) bytes of GPU memory (cudaMemGetInfo), or None where CUDA's runtime is absent."""
    lib = _cudart()
    if lib is None:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return free.value, total.value
