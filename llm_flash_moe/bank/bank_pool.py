"""The expert bank's memory and how records get into it.

A pool holds ``slots`` experts of one record layout: per record part an MLX array ``[slots, *shape]`` (the
arrays the matmuls and kernels index by slot) and a numpy view of the same memory to read into. A record is
read in pieces of ``READ_PIECE_BYTES``, each piece a ``preadv`` on one of the read threads: with unified memory
(Metal, CPU) straight into the pool's own memory; on CUDA into pinned staging, then copied into the slot in GPU
memory by the reading thread (``cuda_memory.DeviceCopies``). The read threads take pieces a layer waits for
before pieces read ahead on a prediction. Which slot an expert goes to is the bank's business
(``expert_bank``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import queue
import threading
import weakref
import zlib
from concurrent.futures import Future
from typing import List, Optional

import numpy as np

from ..flash_layout import RecordLayout
from ..integrity import combine_crcs

# LLM_FLASH_MOE_CHECK_READS=1: every record read from disk is checked against the manifest's CRC-32 as its pieces
# land, so a flipped byte stops with one line instead of answering from damaged weights. Off by default: it cost
# 26 % of a disk-bound token on a 2-core machine, over the 5 % rule (docs/RELIABILITY.md, benchmarks/crc_check.py).
CHECK_READS_ENV = "LLM_FLASH_MOE_CHECK_READS"


def checks_reads() -> bool:
    return os.environ.get(CHECK_READS_ENV, "").strip().lower() in ("1", "true", "yes")
DEFAULT_READ_THREADS = 8  # 8, 16 and 32 measured equal within noise on the H100, 4 slower (docs/PERFORMANCE.md)
READ_PIECE_BYTES = 1 << 20  # records are read in pieces of this size, in parallel (``pieces``)


def drop_from_page_cache(paths) -> bool:
    """Drop files from the OS page cache; False where the OS offers no way (Linux has one)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def device_copies():
    """How records reach the GPU: a DeviceCopies on MLX's CUDA backend, else None (unified memory)."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu or not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return None
    from .cuda_memory import DeviceCopies

    return DeviceCopies()


def allocate_rows(layout: RecordLayout, rows: int, on_device: bool = False):
    """Per record part, an MLX array ``[rows, *shape]`` of the part's dtype and a numpy uint8 view
    ``[rows, nbytes]`` of the same memory (advised to stay in GPU memory when ``on_device``)."""
    import mlx.core as mx

    typed, raw = {}, {}
    for part in layout.parts:
        buf = mx.zeros((rows, part.nbytes), dtype=mx.uint8)
        typed[part.name] = buf.view(getattr(mx, part.dtype)).reshape(rows, *part.shape)
        mx.eval(buf, typed[part.name])
        raw[part.name] = np.array(buf, copy=False)
        if on_device:
            from .cuda_memory import keep_on_device

            keep_on_device(raw[part.name].ctypes.data, raw[part.name].nbytes)
    return typed, raw


def pieces(record_size: int, piece_bytes: Optional[int] = None) -> List[tuple]:
    """The byte ranges ``(start, end)`` a record is read in (pieces of ``READ_PIECE_BYTES`` unless told),
    each by its own read thread: one record is often a layer's only miss, and a disk streams more with several
    requests in flight than with one."""
    step = piece_bytes or READ_PIECE_BYTES
    return [(lo, min(lo + step, record_size)) for lo in range(0, record_size, step)]


class RecordRead:
    """A record's pieces being read; done (``result``) when every piece is, and ``check`` (the record's
    checksum against the manifest's, when the pool checks reads) passed."""

    def __init__(self, futures: List[Future], check=None):
        self.futures, self.check = futures, check

    def result(self) -> None:
        error = None
        for future in self.futures:
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 - the first error is raised once all pieces ended
                error = error or e
        if error is not None:
            raise error
        if self.check is not None:
            self.check()

    def exception(self) -> Optional[BaseException]:
        errors = [f.exception() for f in self.futures]
        return next((e for e in errors if e is not None), None)


def _serve(jobs: "queue.PriorityQueue") -> None:
    """A read thread: run jobs until the stop mark."""
    while True:
        _, _, future, fn, args = jobs.get()
        if future is None:
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the read
            future.set_exception(e)


def _stop(jobs: "queue.PriorityQueue", threads: int) -> None:
    for _ in range(threads):
        jobs.put((Readers.AHEAD + 1, -1, None, None, None))


class Readers:
    """The read threads: pieces of records a layer waits for (``URGENT``) before pieces read ahead on a
    prediction (``AHEAD``), each kind in the order submitted. A wrong prediction's reads then never stand
    between a layer and its misses. The threads stop on ``shutdown`` or when this is garbage."""

    URGENT, AHEAD = 0, 1

    def __init__(self, threads: int):
        self._queue: "queue.PriorityQueue" = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=_serve, args=(self._queue,), name=f"flash-moe-read-{i}",
                                          daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()
        self._stop = weakref.finalize(self, _stop, self._queue, threads)

    def submit(self, priority: int, fn, *args) -> Future:
        future: Future = Future()
        self._queue.put((priority, next(self._order), future, fn, args))
        return future

    def shutdown(self) -> None:
        self._stop()
        for thread in self._threads:
            thread.join()


class Pool:
    """``slots`` experts of one record layout, and how one piece of a record is read into one slot."""

    def __init__(self, layout: RecordLayout, slots: int, copies=None, check: Optional[bool] = None):
        self.layout, self.slots, self.copies = layout, slots, copies
        check = checks_reads() if check is None else check
        self.arrays, self._rows = allocate_rows(layout, slots, on_device=copies is not None)
        self._local = threading.local()
        self._staging: List[mmap.mmap] = []
        self._lock = threading.Lock()
        # per piece, what its bytes are: (part name or None for padding, offset in the part, bytes)
        self.pieces = pieces(layout.record_size)
        self._segments = [self._covering(lo, hi) for lo, hi in self.pieces]
        self._piece_bytes = max(hi - lo for lo, hi in self.pieces)  # a read thread's scratch or staging
        # check: each piece's CRC-32 as it lands (on its read thread), combined into the record's
        self._crcs = np.zeros((slots, len(self.pieces)), dtype=np.int64) if check else None

    def _covering(self, lo: int, hi: int) -> List[tuple]:
        out, position = [], lo
        for part in self.layout.parts:
            start, end = max(part.offset, lo), min(part.offset + part.nbytes, hi)
            if start >= end:
                continue
            if start > position:
                out.append((None, 0, start - position))
            out.append((part.name, start - part.offset, end - start))
            position = end
        if hi > position:
            out.append((None, 0, hi - position))
        return out

    @property
    def nbytes(self) -> int:
        return sum(rows.nbytes for rows in self._rows.values())

    def read(self, fd: int, offset: int, slot: int, piece: int) -> int:
        """Piece ``piece`` of the record at ``offset`` in ``fd`` into ``slot``; returns the bytes read."""
        lo, hi = self.pieces[piece]
        segments = self._segments[piece]
        if self.copies is None:  # unified memory: scatter the piece straight into the pool
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = np.empty(self._piece_bytes, dtype=np.uint8)
            vecs = [memoryview(scratch[:n]) if name is None else memoryview(self._rows[name][slot][at:at + n])
                    for name, at, n in segments]
            n = os.preadv(fd, vecs, offset + lo)
            if self._crcs is not None:
                crc = 0
                for vec in vecs:
                    crc = zlib.crc32(vec, crc)  # releases the GIL on large buffers
                self._crcs[slot, piece] = crc
            return n
        staging = self._staging_buffer()  # CUDA: pinned staging, then the copy engines
        n = os.preadv(fd, [memoryview(staging)[:hi - lo]], offset + lo)
        if self._crcs is not None:
            self._crcs[slot, piece] = zlib.crc32(memoryview(staging)[:hi - lo])
        source, copies = np.frombuffer(staging, dtype=np.uint8).ctypes.data, []
        for name, at, size in segments:
            if name is not None:
                copies.append((self._rows[name][slot].ctypes.data + at, source, size))
            source += size
        self.copies.copy(copies)
        return n

    @property
    def checking(self) -> bool:
        return self._crcs is not None

    def record_checksum(self, slot: int) -> str:
        """The CRC-32 of the record last read into ``slot`` (as flash_layout.record_checksum writes it)."""
        crc = combine_crcs(self._crcs[slot].tolist(), [hi - lo for lo, hi in self.pieces])
        return f"{crc & 0xFFFFFFFF:08x}"

    def read_record(self, fd: int, offset: int, slot: int) -> int:
        """A whole record, piece after piece (loading, not serving: no parallelism needed)."""
        return sum(self.read(fd, offset, slot, i) for i in range(len(self.pieces)))

    def _staging_buffer(self) -> mmap.mmap:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = mmap.mmap(-1, self._piece_bytes)  # page-aligned
            self.copies.pin(np.frombuffer(staging, dtype=np.uint8).ctypes.data, len(staging))
            with self._lock:
                self._staging.append(staging)
        return staging

    def close(self) -> None:
        for staging in self._staging:
            self.copies.unpin(np.frombuffer(staging, dtype=np.uint8).ctypes.data)
        self._staging.clear()
