"""Which expert leaves the bank when a new one needs its slot.

Each slot has a priority; the victims are the free slots first, then the lowest priorities. Two rules:

- ``DecayedFrequency`` (the bank's default): an expert's score is the number of times it was asked for,
  each request weighing half as much every ``half_life`` requests of its layer (LRFU). Its priority
  ``log2(score) + t / half_life`` orders slots by their score at the current time without updating
  every slot at every step. Scores are kept for every expert of every layer, in the bank or not, so an
  expert that was popular before it was evicted comes back with its history: routing is skewed (some
  experts are chosen far more often than others) and that skew outlives any one slot's stay.
- ``LeastRecentlyUsed``: the baseline the default is measured against (benchmark: same capacity, same
  trace).

An expert read ahead on a prediction (prefetch) is inserted without counting as a request: until a layer
asks for it, it ranks by its history alone (an expert with none goes first).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

DEFAULT_HALF_LIFE = 64.0  # requests of a layer; chosen on the benchmark's calibrated routing (docs/PERFORMANCE.md)


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


class DecayedFrequency:
    def __init__(self, slots: int, experts_per_layer: Dict[int, int], half_life: float = DEFAULT_HALF_LIFE):
        self.rate = 1.0 / half_life
        self.priority = np.full(slots, -np.inf)
        self.score = {layer: np.zeros(n) for layer, n in experts_per_layer.items()}
        self.last = {layer: np.zeros(n) for layer, n in experts_per_layer.items()}

    def _decayed(self, layer: int, experts: np.ndarray, now: int) -> np.ndarray:
        return self.score[layer][experts] * np.exp2(-self.rate * (now - self.last[layer][experts]))

    def requested(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        score = self._decayed(layer, experts, now) + 1.0
        self.score[layer][experts], self.last[layer][experts] = score, now
        self.priority[slots] = np.log2(score) + self.rate * now

    def prefetched(self, slots: np.ndarray, layer: int, experts: np.ndarray, now: int) -> None:
        with np.errstate(divide="ignore"):
            self.priority[slots] = np.log2(self._decayed(layer, experts, now)) + self.rate * now
        self.priority[slots] = np.maximum(self.priority[slots], np.finfo(float).min)  # resident: not "free"

    def freed(self, slots: np.ndarray) -> None:
        self.priority[slots] = -np.inf

    def victims(self, n: int, exclude: np.ndarray) -> np.ndarray:
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


def make_policy(name: str, slots: int, experts_per_layer: Dict[int, int], half_life: Optional[float] = None):
    if name == "lru":
        return LeastRecentlyUsed(slots, experts_per_layer)
    if name == "decayed":
        return DecayedFrequency(slots, experts_per_layer, half_life or DEFAULT_HALF_LIFE)
    raise ValueError(f"unknown bank policy {name!r}")
