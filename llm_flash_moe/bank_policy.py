"""Which expert leaves the bank when a new one needs its slot.

Each slot has a priority; the victims are the free slots first, then the lowest priorities. Two rules:

- ``RecencyFrequency`` (the bank's default): LRU's recency plus a bonus for experts asked for often. An
  expert's priority is the clock of its last request (its layer's calls: one per decoded token) plus
  ``RECENCY_WEIGHT`` clock steps per doubling of ``1 + its request count``, each request's weight halving
  every ``HALF_LIFE`` calls of its layer (counts are kept for every expert, in the bank or not, so a popular
  expert evicted once comes back with its history). On new tokens at 512 experts per layer it read 0.94-0.99x
  the records of LRU of the same size in trace replays, where decayed frequency alone (the previous default)
  read up to 1.15x at k=10 (docs/PERFORMANCE.md, "Which expert leaves").
- ``LeastRecentlyUsed``: the baseline (the benchmark replays it on the engine's own requests).

An expert read ahead on a prediction is inserted at the eviction end: until a layer asks for it, it leaves
before any expert that was asked for, so a wrong guess costs its read and never a useful expert.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

RECENCY_WEIGHT = 8.0  # clock steps (decoded tokens) that a doubling of an expert's request count is worth
HALF_LIFE = 128.0  # calls of a layer over which a request's weight in the count halves
# Both chosen by replaying fresh-token routing traces at 512 and 64 experts per layer, k=4 and 10, banks of
# 0.14-0.5 of the experts (docs/PERFORMANCE.md); larger weights won at one setting and lost at others.


class LeastRecentlyUsed:
    def __init__(self, slots: int, experts_per_layer: Dict[int, int]):
        self.priority = np.full(slots, -np.inf)
        self._clock = 0.0

    def requested(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        self._clock += 1
        self.priority[slots] = self._clock

    def prefetched(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        resident = self.priority[np.isfinite(self.priority)]
        self.priority[slots] = (resident.min() if resident.size else self._clock) - 1

    def freed(self, slots: np.ndarray) -> None:
        self.priority[slots] = -np.inf

    def victims(self, n: int, exclude: np.ndarray) -> np.ndarray:
        return _lowest(self.priority, n, exclude)


class RecencyFrequency:
    def __init__(self, slots: int, experts_per_layer: Dict[int, int], weight: float = RECENCY_WEIGHT,
                 half_life: float = HALF_LIFE):
        self.weight, self.rate = weight, 1.0 / half_life
        self.priority = np.full(slots, -np.inf)  # -inf: free; kept current by ``victims``
        self.last = np.zeros(slots)  # clock of the slot's expert's last request
        self.count = np.zeros(slots)  # its decayed request count at that time
        self.ahead = np.zeros(slots, dtype=bool)  # read ahead, not asked for yet
        self.score = {layer: np.zeros(n) for layer, n in experts_per_layer.items()}
        self.seen = {layer: np.zeros(n) for layer, n in experts_per_layer.items()}
        self.now = 0.0

    def requested(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        count = self.score[layer][experts] * np.exp2(-self.rate * (now - self.seen[layer][experts])) + 1.0
        self.score[layer][experts], self.seen[layer][experts] = count, now
        self.last[slots], self.count[slots], self.ahead[slots] = now, count, False
        self.priority[slots] = 0.0  # resident (``victims`` computes the value)
        self.now = max(self.now, now)

    def prefetched(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        self.ahead[slots] = True
        self.priority[slots] = 0.0

    def freed(self, slots: np.ndarray) -> None:
        self.priority[slots] = -np.inf
        self.ahead[slots] = False

    def victims(self, n: int, exclude: np.ndarray) -> np.ndarray:
        resident = np.isfinite(self.priority)
        decayed = self.count * np.exp2(-self.rate * (self.now - self.last))
        value = self.last + self.weight * np.log2(1.0 + decayed)
        value[self.ahead] = np.finfo(float).min / 2  # read ahead and not asked for: first to leave
        self.priority[resident] = value[resident]
        return _lowest(self.priority, n, exclude)


def _lowest(priority: np.ndarray, n: int, exclude: np.ndarray) -> np.ndarray:
    """The ``n`` slots of lowest priority, never one in ``exclude`` (slot numbers)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    saved = priority[exclude]
    priority[exclude] = np.inf  # masked in place (a copy of every priority per call costs more)
    try:
        if n >= len(priority):
            order = np.argsort(priority, kind="stable")[:n]
        else:
            part = np.argpartition(priority, n - 1)[:n]
            order = part[np.argsort(priority[part], kind="stable")]
        if np.isposinf(priority[order]).any():
            raise RuntimeError("the expert bank has fewer free slots than this call needs")
        return order
    finally:
        priority[exclude] = saved


POLICIES = {"recency-frequency": RecencyFrequency, "lru": LeastRecentlyUsed}


def make_policy(name: str, slots: int, experts_per_layer: Dict[int, int]):
    if name not in POLICIES:
        raise ValueError(f"unknown bank policy {name!r}")
    return POLICIES[name](slots, experts_per_layer)
