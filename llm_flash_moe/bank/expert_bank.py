"""The expert bank: experts kept where the kernels read them, addressed by slot; only misses are read.

For each record layout of the model (usually one for all layers) the bank holds a pool of slots
(``bank_pool``: MLX arrays ``[slots, *shape]`` that the matmuls and the fused kernels index by slot id). A host
table maps (layer, expert) to its slot. A hit costs no read and no copy: the layer computes on the slot where
the expert already is. A miss is read straight into a victim slot chosen by the replacement policy
(``bank_policy``), before any read ahead; experts read ahead on a prediction (``prefetch``) land in the bank too.

One cache, not two: where the bank lives in the memory the OS page cache uses (unified memory, the CPU
backend), every record read is dropped from the page cache (``posix_fadvise(DONTNEED)`` on Linux,
``F_NOCACHE`` on macOS), so RAM holds each expert at most once, under the bank's policy. On CUDA the bank
is GPU memory and host RAM keeps the page cache as a second tier.

A slot is refilled only when nothing pending reads it: the experts of the call being served are never
victims, reads in flight are never victims, and the output last computed from a slot is evaluated before
the slot is overwritten (a no-op when decode's per-layer synchronization already did it).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .bank_policy import make_policy
from .bank_pool import DEFAULT_READ_THREADS, Pool, Readers, RecordRead, device_copies
from ..errors import FlashMoeError
from ..flash_layout import ExpertLayer, Manifest, RecordLayout

MIN_SLOTS_PER_TOKEN = 2  # the smallest bank holds this many times the model's experts per token


@dataclass
class BankStats:
    requested: int = 0  # experts asked for by the layers (distinct within a call)
    hits: int = 0  # ... already in the bank (a prefetched expert counts once it is asked for)
    reads: int = 0  # records read from the layer files: misses and prefetches
    bytes_read: int = 0
    prefetch_reads: int = 0  # records read ahead on a prediction
    prefetch_used: int = 0  # ... that the layer's next call asked for
    prefetch_wasted: int = 0  # ... that it did not (they stay in the bank, first in line to leave)
    predicted: int = 0  # experts a prediction named for a layer that then asked for its experts
    predicted_right: int = 0  # ... that the layer did ask for
    read_wait_seconds: float = 0.0  # the layers waiting for their records
    router_launch_seconds: float = 0.0  # host launching the GPU work up to a decoded layer's router
    router_wait_seconds: float = 0.0  # host then waiting for the router's choice

    @property
    def misses(self) -> int:
        return self.requested - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requested if self.requested else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        judged = self.prefetch_used + self.prefetch_wasted
        return self.prefetch_used / judged if judged else 0.0

    @property
    def prediction_recall(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else 0.0

    def since(self, before: "BankStats") -> "BankStats":
        """What happened between ``before`` (a copy taken earlier: ``replace(stats)``) and now."""
        return BankStats(**{k: getattr(self, k) - getattr(before, k) for k in asdict(self)})


def slots_for(budget_bytes: int, layers: Sequence[ExpertLayer], minimum: int) -> Dict[RecordLayout, int]:
    """Slots per record layout: ``budget_bytes`` shared in proportion to each layout's layers, at least
    ``minimum`` and at most every expert of those layers."""
    by_layout: Dict[RecordLayout, List[ExpertLayer]] = {}
    for layer in layers:
        by_layout.setdefault(layer.layout, []).append(layer)
    weight = sum(len(ls) * layout.parts_bytes for layout, ls in by_layout.items())
    out = {}
    for layout, ls in by_layout.items():
        share = budget_bytes * len(ls) / weight if weight else 0
        out[layout] = int(min(sum(l.num_experts for l in ls), max(minimum, share))) if ls else 0
    return out


class ExpertBank:
    """The experts of a prepared model's layers, read on demand into a bank of slots (module docstring)."""

    def __init__(self, model_dir: Path, manifest: Manifest, budget_bytes: Optional[int] = None, min_slots: int = 1,
                 read_threads: int = DEFAULT_READ_THREADS, policy: str = "likelihood",
                 drop_page_cache: Optional[bool] = None):
        self.model_dir = Path(model_dir)
        self.name = manifest.name
        self.layers: Dict[int, ExpertLayer] = {layer.layer: layer for layer in manifest.expert_layers}
        order = sorted(self.layers)
        self.next_layer = dict(zip(order, order[1:]))
        self.stats = BankStats()
        self.trace: Optional[Callable[[int, np.ndarray], None]] = None  # called with every layer's request
        self._copies = device_copies()
        self.drop_page_cache = self._copies is None if drop_page_cache is None else drop_page_cache
        self._fds: Dict[int, int] = {}
        try:
            for layer in manifest.expert_layers:
                self._fds[layer.layer] = self._open(layer)
        except BaseException:
            self._close_files()
            raise
        self._readers = Readers(read_threads)
        self.policy_name, self.min_slots = policy, min_slots
        self._pools: List[Pool] = []
        # No memory is taken before ``resize``: the engine sizes the bank once the resident weights are
        # loaded and the free memory is known.
        self.budget_bytes: Optional[int] = None
        if budget_bytes is not None:
            self.resize(budget_bytes)

    # ------------------------------------------------------------------ files

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
        if self.drop_page_cache and sys.platform == "darwin":
            import fcntl

            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)  # reads bypass the unified buffer cache
        elif self.drop_page_cache and hasattr(os, "posix_fadvise"):
            # no readahead: it would put the neighbouring records in the page cache behind the bank's back
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    @property
    def remedy(self) -> str:
        return (f"run `llm flash-moe verify {self.name}`, then the `llm flash-moe prepare ... --repair` "
                "it prints")

    # ------------------------------------------------------------------ size

    def resize(self, budget_bytes: int) -> None:
        """(Re)allocate the bank for ``budget_bytes``; it starts empty."""
        if self._pools:
            self.clear()  # reads finished, pending outputs evaluated
            for pool in self._pools:
                pool.close()
        self._pools = []
        import mlx.core as mx

        mx.clear_cache()
        self.budget_bytes = int(budget_bytes)
        slots = slots_for(self.budget_bytes, list(self.layers.values()), self.min_slots)
        index: Dict[RecordLayout, int] = {}
        for layout, n in slots.items():
            index[layout] = len(self._pools)
            self._pools.append(Pool(layout, n, self._copies))
        self._pool_of = {layer: index[info.layout] for layer, info in self.layers.items()}
        self.clear()

    def clear(self) -> None:
        """Forget every expert the bank holds (its memory stays allocated)."""
        import mlx.core as mx

        self._drain()
        pending = [o for outputs in getattr(self, "_last_output", []) for o in outputs.values()]
        pending += list(getattr(self, "_layer_output", {}).values())
        if pending:
            mx.eval(*{id(o): o for o in pending}.values())
        self._slot_of = {layer: np.full(info.num_experts, -1, dtype=np.int64) for layer, info in self.layers.items()}
        self._owner = [np.full((pool.slots, 2), -1, dtype=np.int64) for pool in self._pools]  # slot -> (layer, expert)
        experts = {i: {l: self.layers[l].num_experts for l in self.layers if self._pool_of[l] == i}
                   for i in range(len(self._pools))}
        self._policies = [make_policy(self.policy_name, pool.slots, experts[i]) for i, pool in enumerate(self._pools)]
        self._filling: List[Dict[int, RecordRead]] = [{} for _ in self._pools]  # slot -> read in flight
        self._prefetched: Dict[int, set] = {}  # layer -> slots read ahead for its next call
        self._last_output: List[Dict[int, object]] = [{} for _ in self._pools]  # slot -> output computed from it
        self._pinned = (-1, np.zeros(0, dtype=np.int64))  # (pool, slots) of the call being served
        self._clock = {layer: 0 for layer in self.layers}
        self._predictions: Dict[int, set] = {}  # layer -> experts the last prediction named
        self._held = {layer: 0 for layer in self.layers}  # experts of each layer in the bank
        self._tables: Dict[int, object] = {}  # complete layer -> its expert -> slot table, on the device
        self._layer_output: Dict[int, object] = {}  # complete layer -> output computed from any of its slots

    @property
    def slots(self) -> int:
        return sum(pool.slots for pool in self._pools)

    @property
    def nbytes(self) -> int:
        return sum(pool.nbytes for pool in self._pools)

    def capacity(self, layer: int) -> int:
        """How many distinct experts of ``layer`` one call can ask for."""
        return self._pools[self._pool_of[layer]].slots

    def holds_every_expert(self) -> bool:
        """Whether the bank has a slot for every expert of the model."""
        return self.slots >= sum(info.num_experts for info in self.layers.values())

    def held(self) -> int:
        """Experts in the bank now."""
        return sum(self._held.values())

    def complete(self, layer: int) -> bool:
        """Whether every expert of ``layer`` is in the bank."""
        return self._held[layer] == self.layers[layer].num_experts

    def device_table(self, layer: int):
        """For a complete layer, its expert -> slot table as a uint32 MLX array (the layer can then pick
        its slots on the device, with no host synchronization); None otherwise."""
        if not self.complete(layer):
            return None
        table = self._tables.get(layer)
        if table is None:
            import mlx.core as mx

            p = self._pool_of[layer]
            ours = [f for s, f in self._filling[p].items() if self._owner[p][s, 0] == layer]
            if ours:  # a prefetch still writing one of its slots
                self._wait(p, ours)
                for s in [s for s in self._filling[p] if self._owner[p][s, 0] == layer]:
                    del self._filling[p][s]
            table = self._tables[layer] = mx.array(self._slot_of[layer].astype(np.uint32))
        return table

    def served_on_device(self, layer: int, count: int, output) -> None:
        """Account a complete layer's call that picked ``count`` experts on the device; ``output`` reads
        some of its slots (which, unknown to the host: it is evaluated before any of them is refilled)."""
        self.stats.requested += count
        self.stats.hits += count
        self._layer_output[layer] = output

    def fill(self, progress=None) -> None:
        """Read every expert the bank lacks, layer by layer, when it has room for all of them (a bank that
        holds the whole model then serves every layer without host synchronization)."""
        for layer, info in sorted(self.layers.items()):
            p = self._pool_of[layer]
            missing = np.nonzero(self._slot_of[layer] < 0)[0]
            free = self._pools[p].slots - int((self._owner[p][:, 0] >= 0).sum())
            if len(missing) > free:
                raise FlashMoeError(f"the expert bank ({self.nbytes / 1e9:.2f} GB) cannot hold every expert; "
                                    "give it a larger budget (-o bank_gb)")
            if len(missing):
                victims = self._claim(p, len(missing), exclude=np.zeros(0, dtype=np.int64))
                self._wait(p, self._fill(p, layer, missing, victims))
                self._policies[p].prefetched(victims, layer, missing, self._clock[layer])
            if progress is not None:
                progress(layer)

    def arrays(self, layer: int) -> Dict[str, "object"]:
        """The pool ``layer``'s experts live in: per record part an array ``[slots, *shape]``."""
        return self._pools[self._pool_of[layer]].arrays

    # ------------------------------------------------------------------ serving the layers

    def observe(self, layer: int, likelihood) -> None:
        """``layer``'s router softmax over its experts for its latest call, averaged over its tokens (numpy, or
        an evaluated MLX array: the MoE block evaluates it with its synchronization): what the policy ranks by."""
        self._policies[self._pool_of[layer]].observe(layer, np.array(likelihood, dtype=np.float64).reshape(-1))

    def lookup(self, layer: int, experts: np.ndarray, prefetch=None) -> np.ndarray:
        """The slots of ``experts`` (distinct expert ids of ``layer``, at most ``capacity(layer)``), each
        read into the bank first if it is not there; they stay put until the next call. ``prefetch``:
        ``(next layer, predicted experts most likely first, how many of them to read)``, started once this
        call's misses are under way."""
        experts = np.asarray(experts, dtype=np.int64).reshape(-1)
        if self.trace is not None:
            self.trace(layer, experts)
        guess = self._predictions.pop(layer, None)
        if guess is not None:
            self.stats.predicted += len(guess)
            self.stats.predicted_right += len(guess.intersection(experts.tolist()))
        p = self._pool_of[layer]
        policy, table = self._policies[p], self._slot_of[layer]
        self._clock[layer] += 1
        now = self._clock[layer]
        slots = table[experts].copy()
        hit = slots >= 0
        waits = [self._filling[p].pop(int(s)) for s in slots[hit] if int(s) in self._filling[p]]
        ahead = self._prefetched.pop(layer, None)
        if ahead:
            used = ahead.intersection(slots[hit].tolist())
            self.stats.prefetch_used += len(used)
            self.stats.prefetch_wasted += len(ahead) - len(used)
        policy.requested(slots[hit], layer, experts[hit], now)
        missing = experts[~hit]
        if len(missing):
            victims = self._claim(p, len(missing), exclude=slots[hit])
            slots[~hit] = victims
            waits += self._fill(p, layer, missing, victims)
            policy.requested(victims, layer, missing, now)
        self.stats.requested += len(experts)
        self.stats.hits += int(hit.sum())
        self._pinned = (p, slots)
        if prefetch is not None:
            self.prefetch(*prefetch)
        start = time.perf_counter()
        self._wait(p, waits)
        self.stats.read_wait_seconds += time.perf_counter() - start
        return slots

    def prefetch(self, layer: int, experts: np.ndarray, read: Optional[int] = None) -> None:
        """A prediction of ``layer``'s next experts, most likely first: start reading those of the first
        ``read`` (default all) that the bank lacks, into slots no pending work reads; skipped when the bank
        has no such slots to spare. Every predicted expert counts for the prediction's recall."""
        experts = np.asarray(experts, dtype=np.int64).reshape(-1)
        self._predictions[layer] = set(experts.tolist())
        p = self._pool_of[layer]
        candidates = experts[:read]
        missing = candidates[self._slot_of[layer][candidates] < 0]
        if not len(missing):
            return
        busy = set(self._filling[p])
        if self._pinned[0] == p:
            busy.update(self._pinned[1].tolist())
        if self._pools[p].slots - len(busy) < 2 * len(missing):
            return  # a small bank: keep its slots for what the layers actually ask for
        exclude = np.fromiter(busy, dtype=np.int64, count=len(busy))
        victims = self._claim(p, len(missing), exclude=exclude, wait_for_reads=False)
        for slot, future in zip(victims.tolist(), self._fill(p, layer, missing, victims, ahead=True)):
            self._filling[p][slot] = future
        self._prefetched.setdefault(layer, set()).update(victims.tolist())
        self._policies[p].prefetched(victims, layer, missing, self._clock[layer])
        self.stats.prefetch_reads += len(missing)

    def retain(self, layer: int, slots: np.ndarray, output) -> None:
        """Note that ``output`` (not yet evaluated) reads ``slots``: it is evaluated before any is refilled."""
        last = self._last_output[self._pool_of[layer]]
        for s in slots.tolist():
            last[s] = output

    def _claim(self, p: int, n: int, exclude: np.ndarray, wait_for_reads: bool = True) -> np.ndarray:
        """``n`` victim slots of pool ``p`` outside ``exclude`` and reads in flight; their experts leave the
        table, and whatever pending work reads them is evaluated first."""
        busy = set(exclude.tolist())
        busy.update(self._filling[p])
        if wait_for_reads and self._pools[p].slots - len(busy) < n:
            self._wait(p, list(self._filling[p].values()))  # a small bank: reads in flight become candidates
            self._filling[p].clear()
            busy = set(exclude.tolist())
        victims = self._policies[p].victims(n, np.fromiter(busy, dtype=np.int64, count=len(busy)))
        owner = self._owner[p]
        pending = {}
        for slot in victims.tolist():
            layer, expert = (int(v) for v in owner[slot])
            if layer >= 0:
                self._slot_of[layer][expert] = -1
                self._held[layer] -= 1
                self._tables.pop(layer, None)
                output = self._layer_output.pop(layer, None)
                if output is not None:
                    pending[id(output)] = output
            if layer >= 0 and slot in self._prefetched.get(layer, ()):
                self._prefetched[layer].discard(slot)  # read ahead and evicted before its layer came
                self.stats.prefetch_wasted += 1
            output = self._last_output[p].pop(slot, None)
            if output is not None:
                pending[id(output)] = output
        if pending:
            import mlx.core as mx

            mx.eval(*pending.values())
        return victims

    def _fill(self, p: int, layer: int, experts: np.ndarray, slots: np.ndarray,
              ahead: bool = False) -> List[RecordRead]:
        """Enter ``experts`` in the table at ``slots`` and start reading them there (after every read a
        layer waits for, when ``ahead``)."""
        self._slot_of[layer][experts] = slots
        self._owner[p][slots, 0], self._owner[p][slots, 1] = layer, experts
        self._held[layer] += len(experts)
        info, fd, pool = self.layers[layer], self._fds[layer], self._pools[p]
        size = info.layout.record_size
        self.stats.reads += len(experts)
        self.stats.bytes_read += len(experts) * size
        priority = Readers.AHEAD if ahead else Readers.URGENT
        return [RecordRead([self._readers.submit(priority, self._read, pool, fd, info, int(e), int(s), i)
                            for i in range(len(pool.pieces))], self._checker(pool, info, e, s))
                for e, s in zip(experts.tolist(), slots.tolist())]

    def _checker(self, pool: Pool, info: ExpertLayer, expert: int, slot: int):
        """What checks a record once read (its CRC-32 against the manifest's), or None."""
        expected = info.checksums[expert] if pool.checking and expert < len(info.checksums) else ""

        def check():
            if pool.record_checksum(slot) != expected:
                raise FlashMoeError(f"layer {info.layer} expert {expert} in {self.model_dir / info.file} is damaged "
                                    f"(checksum mismatch); {self.remedy}")

        return check if expected else None

    def _read(self, pool: Pool, fd: int, info: ExpertLayer, expert: int, slot: int, piece: int) -> None:
        lo, hi = pool.pieces[piece]
        offset = expert * info.layout.record_size
        try:
            n = pool.read(fd, offset, slot, piece)
        except OSError as e:
            raise FlashMoeError(f"cannot read expert {expert} from {self.model_dir / info.file} "
                                f"({e.strerror}); {self.remedy}")
        if n != hi - lo:
            raise FlashMoeError(f"{self.model_dir / info.file} is truncated at expert {expert}; {self.remedy}")
        if self.drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset + lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def _wait(self, p: int, futures: List[RecordRead]) -> None:
        """Wait for reads; if one failed, forget everything they were filling (its slot holds no expert)."""
        error = None
        for future in futures:
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the table is made right
                error = error or e
        if error is not None:
            owner = self._owner[p]
            for layer in self.layers:
                if self._pool_of[layer] == p:
                    self._slot_of[layer][:] = -1
                    self._held[layer] = 0
                    self._tables.pop(layer, None)
            owner[:] = -1
            self._filling[p].clear()
            self._prefetched.clear()
            self._policies[p].freed(np.arange(len(owner)))
            raise error

    def _drain(self) -> None:
        for filling in getattr(self, "_filling", []):
            for future in filling.values():
                future.exception()
            filling.clear()

    # ------------------------------------------------------------------ end

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        self._drain()
        self._readers.shutdown()
        for pool in self._pools:
            pool.close()
        self._pools = []
        self._close_files()
