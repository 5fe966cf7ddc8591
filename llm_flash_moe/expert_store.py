"""The expert store: reads the records the router picked straight into preallocated MLX buffers.

One ``os.preadv`` per expert scatters its record into per-part slot buffers (gate/up/down weight,
scales, biases), so the arrays handed to the matmuls are views of memory the read filled, with no copy.
Several reads are in flight at once (preadv releases the GIL); by default the OS page cache is the only
cache, and an optional in-memory LRU of whole records can be given a byte budget.
"""

from __future__ import annotations

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
from .flash_layout import ExpertLayer, Manifest, RecordLayout, split_record

DEFAULT_SLOTS = 64
DEFAULT_READ_THREADS = 8
_MX_DTYPES = ("uint32", "bfloat16", "float16", "float32")


@dataclass
class StoreStats:
    bytes_read: int = 0  # bytes read from the layer files
    reads: int = 0  # records read from the layer files
    cache_hits: int = 0  # records served by the in-memory cache
    read_seconds: float = 0.0  # wall time spent waiting for records

    @property
    def hit_rate(self) -> float:
        total = self.reads + self.cache_hits
        return self.cache_hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}

    def since(self, before: "StoreStats") -> "StoreStats":
        """What happened between ``before`` (a copy taken earlier: ``replace(stats)``) and now."""
        return StoreStats(self.bytes_read - before.bytes_read, self.reads - before.reads,
                          self.cache_hits - before.cache_hits, self.read_seconds - before.read_seconds)


class _SlotBuffers:
    """``slots`` experts' worth of each record part, as MLX arrays and writable numpy views of them."""

    def __init__(self, layout: RecordLayout, slots: int):
        import mlx.core as mx

        self.layout, self.slots = layout, slots
        self.typed: Dict[str, "mx.array"] = {}
        self.iovecs: List[List[memoryview]] = [[] for _ in range(slots)]
        raw = {}
        on_cuda = mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()
        for part in layout.parts:
            buf = mx.zeros((slots, part.nbytes), dtype=mx.uint8)
            typed = buf.view(getattr(mx, part.dtype)).reshape(slots, *part.shape)
            mx.eval(buf, typed)
            raw[part.name] = np.array(buf, copy=False)
            self.typed[part.name] = typed
            if on_cuda:  # the GPU reads the records where the reads put them, without page migration
                from .cuda_memory import keep_on_host_for_gpu

                keep_on_host_for_gpu(raw[part.name].ctypes.data, raw[part.name].nbytes)
        self._raw = raw
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
                vecs.append(memoryview(raw[part.name][s]))
            if tail:
                vecs.append(memoryview(self._scratch[s, :tail]))
            self.iovecs[s] = vecs

    def fill_from_record(self, slot: int, record: np.ndarray) -> None:
        for name, view in split_record(record, self.layout).items():
            self._raw[name][slot] = view.reshape(-1).view(np.uint8)

    def views(self, n: int) -> Dict[str, "mx.array"]:
        return {name: typed[:n] for name, typed in self.typed.items()}


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
        self._buffers: Dict[RecordLayout, _SlotBuffers] = {}
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="flash-moe-read")
        self._cache = RecordCache(cache_bytes)
        self._busy = {}  # layout -> arrays computed from its buffers, evaluated before the buffers are reused
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

    def buffers(self, layer: int) -> _SlotBuffers:
        layout = self.layers[layer].layout
        if layout not in self._buffers:
            self._buffers[layout] = _SlotBuffers(layout, self.slots)
        return self._buffers[layout]

    def load(self, layer: int, experts: Sequence[int]) -> Dict[str, "mx.array"]:
        """Bring ``experts`` (at most ``slots`` of them) of ``layer`` into the slot buffers, in that order.

        Returns each part as an array [len(experts), ...], a view of the buffers valid until the next
        ``load`` that uses the same record layout.
        """
        import mlx.core as mx

        if len(experts) > self.slots:
            raise ValueError(f"{len(experts)} experts do not fit {self.slots} slots")
        buffers = self.buffers(layer)
        pending = self._busy.pop(buffers.layout, None)
        if pending is not None:
            mx.eval(pending)  # the previous user of these buffers must be done with them
        start = time.perf_counter()
        info = self.layers[layer]
        misses = []
        for slot, e in enumerate(experts):
            record = self._cache.get((layer, int(e)))
            if record is None:
                misses.append((slot, int(e)))
            else:
                buffers.fill_from_record(slot, record)
                self.stats.cache_hits += 1
        if misses:
            list(self._pool.map(lambda m: self._read(info, buffers, *m), misses))
        self.stats.read_seconds += time.perf_counter() - start
        return buffers.views(len(experts))

    @property
    def cache_bytes(self) -> int:
        return self._cache.budget

    def set_cache_bytes(self, budget: int) -> None:
        """Resize the in-memory record cache (0 turns it off), evicting as needed."""
        self._cache.resize(budget)

    def retain(self, layer: int, result) -> None:
        """Record an array computed from the buffers of ``layer``; it is evaluated before they are refilled."""
        self._busy[self.layers[layer].layout] = result

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
        if self._cache.budget:
            record = np.empty(size, dtype=np.uint8)
            position = 0
            for vec in buffers.iovecs[slot]:
                record[position:position + vec.nbytes] = np.frombuffer(vec, dtype=np.uint8)
                position += vec.nbytes
            self._cache.put((info.layer, expert), record)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class RecordCache:
    """An LRU of whole expert records within a byte budget (0 = off: rely on the OS page cache)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self._records: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        if not self.budget:
            return None
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                self._records.move_to_end(key)
            return record

    def resize(self, budget: int) -> None:
        with self._lock:
            self.budget = int(budget)
            self._evict()

    def _evict(self) -> None:
        while self.used > self.budget:
            _, old = self._records.popitem(last=False)
            self.used -= old.nbytes

    def put(self, key, record: np.ndarray) -> None:
        if record.nbytes > self.budget:
            return
        with self._lock:
            if key in self._records:
                return
            self._records[key] = record
            self.used += record.nbytes
            self._evict()
