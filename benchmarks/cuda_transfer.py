"""Host -> GPU paths for expert records on MLX's CUDA backend: which is fastest? Prints one JSON object.

MLX arrays live in CUDA managed memory; a record the CPU just wrote there migrates to the GPU page by
page on first touch. Compared, for k records of the 397B's 4-bit size read from the page cache:
  managed    preadv straight into MLX buffers, then a GPU op on them (pages migrate on first touch)
  prefetch   the same, plus cudaMemPrefetchAsync of the buffers to the GPU before the op
  advised    buffers advised host-resident and GPU-mapped (llm_flash_moe.bank.cuda_memory; the engine's path)
  copy       preadv into numpy (pageable host memory), then mx.array(...) and a GPU op
  staged     preadv into pinned host staging, cudaMemcpyAsync into MLX buffers advised to stay in GPU
             memory (llm_flash_moe.bank.cuda_memory.DeviceCopies), then the GPU op reads GPU memory
"""

import ctypes
import ctypes.util
import glob
import json
import mmap
import os
import sys
import time

import mlx.core as mx
import numpy as np

RECORD = 7_077_888


def cudart():
    names = [ctypes.util.find_library("cudart")] + sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*")) + \
        sorted(glob.glob(os.path.join(sys.prefix, "lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so*"))) + \
        sorted(glob.glob("/tmp/site/nvidia/cuda_runtime/lib/libcudart.so*")) + sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libcudart.so*"))
    for name in names:
        if name:
            try:
                return ctypes.CDLL(name), name
            except OSError:
                pass
    return None, None


def main(k=10, repeats=20, path="/tmp/records.bin"):
    if not os.path.exists(path) or os.path.getsize(path) != 64 * RECORD:
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 255, 64 * RECORD, dtype=np.uint8).tobytes())
    fd = os.open(path, os.O_RDONLY)
    lib, libname = cudart()
    out = {"k": k, "record_bytes": RECORD, "cudart": libname}
    buf = mx.zeros((k, RECORD // 4), dtype=mx.uint32)
    mx.eval(buf)
    view = np.array(buf, copy=False)
    out["numpy_view_writable"] = bool(view.flags.writeable)
    ptr = view.ctypes.data

    def fill(target):
        for i in range(k):
            os.preadv(fd, [memoryview(target[i]).cast("B")], ((i * 7) % 64) * RECORD)

    def gpu_touch(a):
        mx.eval(mx.sum(a, axis=1))

    def timed(step):
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return round(1000 * float(np.median(times)), 3)

    out["read_only_ms"] = timed(lambda: fill(view))
    out["managed_ms"] = timed(lambda: (fill(view), gpu_touch(buf)))
    out["gpu_op_resident_ms"] = timed(lambda: gpu_touch(buf))
    if lib is not None:
        class Location(ctypes.Structure):  # cudaMemLocation (CUDA 13)
            _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]

        def hint():  # CUDA 13: cudaMemPrefetchAsync(ptr, size, location, flags, stream)
            return lib.cudaMemPrefetchAsync(ctypes.c_void_p(ptr), ctypes.c_size_t(k * RECORD), Location(1, 0),
                                            ctypes.c_uint(0), ctypes.c_void_p(0))

        out["prefetch_status"] = int(hint())
        out["prefetch_ms"] = timed(lambda: (fill(view), hint(), gpu_touch(buf)))
        from llm_flash_moe.bank.cuda_memory import keep_on_host_for_gpu

        out["advise_ok"] = keep_on_host_for_gpu(ptr, k * RECORD)
        out["advised_ms"] = timed(lambda: (fill(view), gpu_touch(buf)))
        from llm_flash_moe.bank.cuda_memory import DeviceCopies, keep_on_device

        device_buf = mx.zeros((k, RECORD // 4), dtype=mx.uint32)
        mx.eval(device_buf)
        device_ptr = np.array(device_buf, copy=False).ctypes.data
        out["keep_on_device_ok"] = keep_on_device(device_ptr, k * RECORD)
        staging = np.frombuffer(mmap.mmap(-1, k * RECORD), dtype=np.uint32).reshape(k, RECORD // 4)
        copies = DeviceCopies()
        copies.pin(staging.ctypes.data, k * RECORD)
        pairs = [(device_ptr + i * RECORD, staging.ctypes.data + i * RECORD, RECORD) for i in range(k)]
        out["staged_copy_only_ms"] = timed(lambda: copies.copy(pairs))
        out["staged_ms"] = timed(lambda: (fill(staging), copies.copy(pairs), gpu_touch(device_buf)))
        out["gpu_op_after_staging_ms"] = timed(lambda: gpu_touch(device_buf))
        out["staged_matches"] = bool(np.array_equal(np.array(device_buf), staging))
    host = np.empty((k, RECORD // 4), dtype=np.uint32)
    out["copy_ms"] = timed(lambda: (fill(host), gpu_touch(mx.array(host))))
    for key in ("managed_ms", "prefetch_ms", "advised_ms", "staged_ms", "staged_copy_only_ms", "copy_ms"):
        if key in out:
            out[key.replace("_ms", "_gbps")] = round(k * RECORD / out[key] / 1e6, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
