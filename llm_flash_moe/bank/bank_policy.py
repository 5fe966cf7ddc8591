"""Which expert leaves the bank when a new one needs its slot.

Each slot has a priority; the victims are the free slots first, then the lowest priorities. Two rules:

- ``RouterLikelihood`` (the bank's default): an expert's priority is how likely its layer's router finds it
  now: the router's full softmax over the layer's experts (not only the k it picked), averaged over the
  layer's last calls with weight ``MEMORY`` on the past. Consecutive tokens' hidden states are alike, so an
  expert the router rates highly, chosen or not, is likely to be chosen in the next tokens; one it rates low
  is not, however recently it was used. Ties (layers whose router was never observed) go by recency.
  In replays of fresh-token routing at 512 experts per layer it read 0.88-0.93x the records of LRU of the
  same capacity, where recency and frequency of the choices alone (LRU-2, ARC, decayed frequency, their
  blends) stayed within 0.96-1.12x (docs/PERFORMANCE.md, "Which expert leaves").
- ``LeastRecentlyUsed``: the baseline (the benchmark replays it on the engine's own requests).

An expert read ahead on a prediction is inserted at the eviction end: until a layer asks for it, it leaves
before any expert that was asked for, so a wrong guess costs its read and never a useful expert.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

MEMORY = 0.5  # weight of the past in an expert's likelihood at each call of its layer (replays: 0.3-0.5 best)
RECENCY_TIE_BREAK = 1e-12  # per clock step: orders equal likelihoods by recency, far below any real difference


class LeastRecentlyUsed:
    def __init__(self, slots: int, experts_per_layer: Dict[int, int]):
        self.priority = np.full(slots, -np.inf)
        self._clock = 0.0

    def observe(self, layer: int, likelihood: np.ndarray) -> None:
        pass  # recency alone

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


class RouterLikelihood:
    def __init__(self, slots: int, experts_per_layer: Dict[int, int], memory: float = MEMORY):
        self.memory = memory
        self.priority = np.full(slots, -np.inf)  # -inf: free; kept current by ``victims``
        self.layer = np.zeros(slots, dtype=np.int64)  # the slot's expert
        self.expert = np.zeros(slots, dtype=np.int64)
        self.last = np.zeros(slots)  # clock of its last request
        self.ahead = np.zeros(slots, dtype=bool)  # read ahead, not asked for yet
        layers = max(experts_per_layer, default=-1) + 1
        self.likelihood = np.zeros((layers, max(experts_per_layer.values(), default=0)))
        self.clock = 0

    def observe(self, layer: int, likelihood: np.ndarray) -> None:
        """The layer's router softmax over its experts for its latest call (the mean over a chunk's tokens)."""
        row = self.likelihood[layer, :len(likelihood)]
        row *= self.memory
        row += (1.0 - self.memory) * likelihood

    def requested(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        self.clock += 1
        self.layer[slots], self.expert[slots] = layer, experts
        self.last[slots], self.ahead[slots] = self.clock, False
        self.priority[slots] = 0.0  # resident (``victims`` computes the value)

    def prefetched(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        self.layer[slots], self.expert[slots] = layer, experts
        self.ahead[slots] = True
        self.priority[slots] = 0.0

    def freed(self, slots: np.ndarray) -> None:
        self.priority[slots] = -np.inf
        self.ahead[slots] = False

    def victims(self, n: int, exclude: np.ndarray) -> np.ndarray:
        resident = np.isfinite(self.priority)
        value = self.likelihood[self.layer, self.expert] + RECENCY_TIE_BREAK * self.last
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


POLICIES = {"likelihood": RouterLikelihood, "lru": LeastRecentlyUsed}


def make_policy(name: str, slots: int, experts_per_layer: Dict[int, int]):
    if name not in POLICIES:
        raise ValueError(f"unknown bank policy {name!r}")
    return POLICIES[name](slots, experts_per_layer)
