"""The expert store: reads the records the router picked straight into preallocated MLX buffers.

One ``os.preadv`` per expert scatters its record into per-part slot buffers (gate/up/down weight,
scales, biases). With unified memory (Metal, CPU) the arrays handed to the matmuls are views of the
memory the read filled, with no copy; on CUDA the read fills pinned host staging and the same thread
DMAs the record into GPU memory (``cuda_memory.DeviceCopies``), so reads and copies both run beside
the GPU's work. Several reads are in flight at once (preadv releases the GIL); by default the OS page
cache is the only cache, and an optional in-memory LRU of whole records can be given a byte budget.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .errors import FlashMoeError
from .flash_layout import ExpertLayer, Manifest, RecordLayout

DEFAULT_SLOTS = 32  # per buffer set; two sets (alternate MoE layers) so one fills while the other computes
DEFAULT_READ_THREADS = 8  # 8, 16 and 32 measured equal within noise on the H100, 4 slower (docs/PERFORMANCE.md)


@dataclass
class StoreStats:
    bytes_read: int = 0  # bytes read from the layer files
    reads: int = 0  # records read from the layer files
    cache_hits: int = 0  # records served by the in-memory cache
    read_seconds: float = 0.0  # wall time spent waiting for records
    router_launch_seconds: float = 0.0  # host launching the GPU work up to a layer's router (decode)
    router_wait_seconds: float = 0.0  # host then waiting for the GPU to deliver the router's choice
    prefetch_hits: int = 0  # records a layer needed that the previous layer's prediction had read
    prefetch_misses: int = 0  # records a layer needed beyond the prediction
    prefetch_wasted: int = 0  # predicted records the layer did not need (read for nothing)

    @property
    def hit_rate(self) -> float:
        total = self.reads + self.cache_hits
        return self.cache_hits / total if total else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        total = self.prefetch_hits + self.prefetch_misses
        return self.prefetch_hits / total if total else 0.0

    def since(self, before: "StoreStats") -> "StoreStats":
        """What happened between ``before`` (a copy taken earlier: ``replace(stats)``) and now."""
        return StoreStats(**{k: getattr(self, k) - getattr(before, k) for k in asdict(self)})


class _SlotBuffers:
    """``slots`` experts' worth of each record part: the MLX arrays the matmuls read, and where reads land.

    Without ``copies`` the reads land in the MLX arrays themselves (unified memory: Metal, CPU). With
    ``copies`` (CUDA) they land in pinned host staging laid out the same way, and ``publish`` copies a
    slot into the MLX arrays, which are advised to stay in GPU memory (cuda_memory.DeviceCopies).
    """

    def __init__(self, layout: RecordLayout, slots: int, copies=None):
        import mlx.core as mx

        self.layout, self.slots, self.copies = layout, slots, copies
        self.typed: Dict[str, "mx.array"] = {}
        self.iovecs: List[List[memoryview]] = [[] for _ in range(slots)]
        device, staged = {}, {}
        if copies is not None:
            self._staging = mmap.mmap(-1, slots * layout.parts_bytes)  # page-aligned
            copies.pin(np.frombuffer(self._staging, dtype=np.uint8).ctypes.data, len(self._staging))
        position = 0
        for part in layout.parts:
            buf = mx.zeros((slots, part.nbytes), dtype=mx.uint8)
            typed = buf.view(getattr(mx, part.dtype)).reshape(slots, *part.shape)
            mx.eval(buf, typed)
            device[part.name] = np.array(buf, copy=False)
            self.typed[part.name] = typed
            if copies is None:
                staged[part.name] = device[part.name]
            else:
                staged[part.name] = np.frombuffer(self._staging, dtype=np.uint8, count=slots * part.nbytes,
                                                  offset=position).reshape(slots, part.nbytes)
                position += slots * part.nbytes
                from .cuda_memory import keep_on_device

                keep_on_device(device[part.name].ctypes.data, device[part.name].nbytes)
        self._device = device
        self._copy_plan = [[(device[p.name][s].ctypes.data, staged[p.name][s].ctypes.data, p.nbytes)
                            for p in layout.parts] for s in range(slots)] if copies is not None else None
        gaps = []
        position = 0
        for part in layout.parts:
            gaps.append(part.offset - position)
            position = part.offset + part.nbytes
        tail = layout.record_size - position
        self._scratch = np.empty((slots, max(gaps + [tail, 1])), dtype=np.uint8)
        for s in range(slots):
            vecs = []
            for gap, part in zip(gaps, layout.parts):
                if gap:
                    vecs.append(memoryview(self._scratch[s, :gap]))
                vecs.append(memoryview(staged[part.name][s]))
            if tail:
                vecs.append(memoryview(self._scratch[s, :tail]))
            self.iovecs[s] = vecs

    def device_rows(self, slot: int) -> List[np.ndarray]:
        """The slot's part rows in the arrays the matmuls read (on CUDA: GPU memory, never touched by the CPU)."""
        return [self._device[part.name][slot] for part in self.layout.parts]

    def publish(self, slot: int) -> None:
        """Make what the reads put in ``slot`` visible to the matmuls (a copy to the GPU where staged)."""
        if self.copies is not None:
            self.copies.copy(self._copy_plan[slot])

    def views(self, n: int) -> Dict[str, "mx.array"]:
        return {name: typed[:n] for name, typed in self.typed.items()}

    def close(self) -> None:
        if self.copies is not None:
            self.copies.unpin(np.frombuffer(self._staging, dtype=np.uint8).ctypes.data)


def device_copies():
    """How records reach the GPU: a DeviceCopies on MLX's CUDA backend, else None (unified memory)."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu or not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return None
    from .cuda_memory import DeviceCopies

    return DeviceCopies()


class ExpertStore:
    def __init__(self, model_dir: Path, manifest: Manifest, cache_bytes: int = 0,
                 slots: int = DEFAULT_SLOTS, read_threads: int = DEFAULT_READ_THREADS):
        self.model_dir = Path(model_dir)
        self.name = manifest.name
        self.layers: Dict[int, ExpertLayer] = {layer.layer: layer for layer in manifest.expert_layers}
        self.slots = min(slots, max(layer.num_experts for layer in manifest.expert_layers))
        self.stats = StoreStats()
        self._fds: Dict[int, int] = {}
        for layer in manifest.expert_layers:
            self._fds[layer.layer] = self._open(layer)
        order = sorted(self.layers)
        sets: Dict[tuple, int] = {}  # one buffer set per record layout and parity of the layer's position
        self._set_of = {layer: sets.setdefault((self.layers[layer].layout, i % 2), len(sets))
                        for i, layer in enumerate(order)}
        self.next_layer = dict(zip(order, order[1:]))
        self._buffers: Dict[int, _SlotBuffers] = {}  # buffer set number -> its buffers
        self._copies = device_copies()
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="flash-moe-read")
        self._cache = RecordCache(cache_bytes, self._copies, max_records=sum(l.num_experts for l in self.layers.values()),
                                  record_bytes=max(l.layout.parts_bytes for l in self.layers.values()))
        self._busy = {}  # buffer set -> arrays computed from it, evaluated before the set is refilled
        self._prefetched: Dict[int, tuple] = {}  # layer -> (experts, futures) read ahead into its buffer set
        self._lock = threading.Lock()

    def _open(self, layer: ExpertLayer) -> int:
        path = self.model_dir / layer.file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            what = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror})"
            raise FlashMoeError(f"expert file {path} is {what}; {self.remedy}")
        size = os.fstat(fd).st_size
        if size != layer.file_size:
            os.close(fd)
            raise FlashMoeError(f"expert file {path} has {size:,} bytes, expected {layer.file_size:,}; {self.remedy}")
        return fd

    @property
    def remedy(self) -> str:
        return (f"run `llm flash-moe verify {self.name}`, then the `llm flash-moe prepare ... --repair` "
                "it prints")

    def _key(self, layer: int) -> int:
        return self._set_of[layer]  # a number: hashing a record layout on every call is slow

    def buffers(self, layer: int) -> _SlotBuffers:
        """The buffer set of ``layer``: one per record layout and per parity of the layer's position."""
        key = self._key(layer)
        if key not in self._buffers:
            self._buffers[key] = _SlotBuffers(self.layers[layer].layout, self.slots, self._copies)
        return self._buffers[key]

    def _claim(self, layer: int) -> _SlotBuffers:
        """The layer's buffer set, once whatever was computed from its previous contents is done."""
        import mlx.core as mx

        pending = self._busy.pop(self._key(layer), None)
        if pending is not None:
            mx.eval(pending)
        return self.buffers(layer)

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Start reading ``experts`` of ``layer`` in the background (a prediction; ``load`` uses what it needs)."""
        if layer in self._prefetched or 2 * len(experts) > self.slots:
            return
        buffers, info = self._claim(layer), self.layers[layer]
        experts = [int(e) for e in experts]
        futures = [self._pool.submit(self._fetch, info, buffers, slot, e) for slot, e in enumerate(experts)]
        self._prefetched[layer] = (experts, futures)

    def load(self, layer: int, experts: Sequence[int]):
        """Bring ``experts`` (at most ``slots`` of them) of ``layer`` into its buffer set.

        Returns ``(parts, slots)``: each part as an array [n, ...] (a view of the buffers, valid until the
        set is refilled) and, for each requested expert, the index of its slot in those arrays. Without a
        prefetch the experts fill slots 0, 1, ... in the order given.
        """
        if len(experts) > self.slots:
            raise ValueError(f"{len(experts)} experts do not fit {self.slots} slots")
        start = time.perf_counter()
        info = self.layers[layer]
        experts = [int(e) for e in experts]
        predicted, futures = self._prefetched.pop(layer, ((), ()))
        buffers = self.buffers(layer) if futures else self._claim(layer)
        slot_of = {e: slot for slot, e in enumerate(predicted)}
        hits = sum(e in slot_of for e in experts)
        if futures:
            self.stats.prefetch_hits += hits
            self.stats.prefetch_misses += len(experts) - hits
            self.stats.prefetch_wasted += len(predicted) - hits
        misses = [e for e in experts if e not in slot_of]
        for e in misses:
            slot_of[e] = len(slot_of)
        try:
            list(self._pool.map(lambda e: self._fetch(info, buffers, slot_of[e], e), misses))
        finally:
            for future in futures:  # a prefetch may still be writing into this set: let it finish
                future.result()
        self.stats.read_seconds += time.perf_counter() - start
        slots = np.array([slot_of[e] for e in experts], dtype=np.uint32)
        return buffers.views(int(slots.max()) + 1 if len(slots) else 0), slots

    def _fetch(self, info: ExpertLayer, buffers: _SlotBuffers, slot: int, expert: int) -> None:
        """One record into one slot: from the in-memory cache if it holds it, else from the file."""
        if self._cache.fill((info.layer, expert), buffers, slot):
            with self._lock:
                self.stats.cache_hits += 1
            return
        self._read(info, buffers, slot, expert)
        buffers.publish(slot)
        self._cache.put((info.layer, expert), buffers, slot)

    @property
    def cache_bytes(self) -> int:
        return self._cache.budget

    def set_cache_bytes(self, budget: int) -> None:
        """Resize the in-memory record cache (0 turns it off), evicting as needed."""
        self._cache.resize(budget)

    def retain(self, layer: int, result) -> None:
        """Record an array computed from the buffers of ``layer``; it is evaluated before they are refilled."""
        self._busy[self._key(layer)] = result

    def _read(self, info: ExpertLayer, buffers: _SlotBuffers, slot: int, expert: int) -> None:
        size = info.layout.record_size
        try:
            n = os.preadv(self._fds[info.layer], buffers.iovecs[slot], expert * size)
        except OSError as e:
            raise FlashMoeError(f"cannot read expert {expert} from {self.model_dir / info.file} "
                                f"({e.strerror}); {self.remedy}")
        if n != size:
            raise FlashMoeError(f"{self.model_dir / info.file} is truncated at expert {expert}; {self.remedy}")
        with self._lock:
            self.stats.bytes_read += n
            self.stats.reads += 1

    def close(self) -> None:
        for _, futures in self._prefetched.values():
            for future in futures:
                future.exception()
        self._prefetched.clear()
        self._pool.shutdown(wait=True)
        for buffers in self._buffers.values():
            buffers.close()
        self._buffers.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class RecordCache:
    """An LRU of whole expert records within a byte budget (0 = off: rely on the OS page cache).

    The records' parts are kept packed in rows of one preallocated MLX array, next to the slot buffers:
    in GPU memory on CUDA, where a hit is a device-to-device copy into the slot (no read, no transfer
    across the bus), in host memory elsewhere. Rows are allocated on first use, at most ``max_records``.
    """

    def __init__(self, budget: int, copies=None, max_records: int = 0, record_bytes: int = 1):
        self.copies, self.max_records, self.record_bytes = copies, max_records, record_bytes
        self._lock = threading.Lock()
        self.resize(budget)

    def resize(self, budget: int) -> None:
        with self._lock:
            self.budget = int(budget)
            self._rows: "OrderedDict[tuple, int]" = OrderedDict()  # key -> row, least recently used first
            self._pool = None

    def _allocate(self) -> bool:
        capacity = min(self.budget // self.record_bytes, self.max_records)
        if capacity < 1:
            return False
        if self._pool is None:
            import mlx.core as mx

            pool = mx.zeros((capacity, self.record_bytes), dtype=mx.uint8)
            mx.eval(pool)
            self._pool = (pool, np.array(pool, copy=False))
            if self.copies is not None:
                from .cuda_memory import keep_on_device

                keep_on_device(self._pool[1].ctypes.data, self._pool[1].nbytes)
        return True

    def _copy(self, pairs) -> None:
        """``(destination row, source row)`` numpy views: by the GPU's copy engines where there are any."""
        if self.copies is not None:
            self.copies.copy([(d.ctypes.data, s.ctypes.data, s.nbytes) for d, s in pairs])
        else:
            for d, s in pairs:
                d[:] = s

    def _packed(self, row: int, parts: List[np.ndarray]) -> List[np.ndarray]:
        out, position = [], 0
        for part in parts:
            out.append(self._pool[1][row, position:position + part.nbytes])
            position += part.nbytes
        return out

    def fill(self, key, buffers: _SlotBuffers, slot: int) -> bool:
        """Copy the record ``key`` into ``slot`` if the cache holds it."""
        if not self.budget:
            return False
        with self._lock:  # held while copying, so that no put reuses the row meanwhile
            row = self._rows.get(key)
            if row is None:
                return False
            self._rows.move_to_end(key)
            parts = buffers.device_rows(slot)
            self._copy(list(zip(parts, self._packed(row, parts))))
            return True

    def put(self, key, buffers: _SlotBuffers, slot: int) -> None:
        """Keep a copy of the record just brought into ``slot``, evicting the least recently used."""
        if not self.budget:
            return
        with self._lock:
            if key in self._rows or not self._allocate():
                return
            if len(self._rows) < len(self._pool[1]):
                row = len(self._rows)
            else:
                _, row = self._rows.popitem(last=False)
            self._rows[key] = row
            parts = buffers.device_rows(slot)
            self._copy(list(zip(self._packed(row, parts), parts)))
