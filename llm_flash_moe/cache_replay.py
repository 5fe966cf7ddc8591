"""Caches replayed on a recorded request trace: how many records LRU and Belady's MIN would read.

A trace is the list of calls the bank served, ``(layer, experts)`` in order (``benchmark.Requests``). Both
replays hold ``capacity`` (layer, expert) entries in one pool, as the bank does, and count the misses of the
calls from number ``count_from`` on (the ones after a warm-up). MIN evicts the entry whose next request lies
furthest ahead: no cache of that size can read fewer records on that trace, so it is the floor any policy,
prediction included, is measured against.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

Call = Tuple[int, Sequence[int]]


def lru_misses(calls: List[Call], capacity: int, per_layer: bool = False, count_from: int = 0) -> int:
    """Misses of an LRU of ``capacity`` entries over ``calls`` (global, or ``capacity`` per layer when
    ``per_layer``), counted from call number ``count_from`` on."""
    caches: Dict[object, OrderedDict] = {}
    misses = 0
    for i, (layer, experts) in enumerate(calls):
        cache = caches.setdefault(layer if per_layer else None, OrderedDict())
        for e in experts:
            key = (layer, e)
            if key in cache:
                cache.move_to_end(key)
                continue
            misses += i >= count_from
            cache[key] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return misses


def min_misses(calls: List[Call], capacity: int, count_from: int = 0) -> int:
    """Misses of Belady's MIN (evict the entry requested again furthest ahead, or never) of ``capacity``
    entries over ``calls``, counted from call number ``count_from`` on."""
    keys = [(layer, int(e)) for layer, experts in calls for e in experts]
    call_of = [i for i, (_, experts) in enumerate(calls) for _ in experts]
    never = len(keys)
    next_use, last = [never] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        next_use[i] = last.get(keys[i], never)
        last[keys[i]] = i
    cached: Dict[Tuple[int, int], int] = {}  # key -> its next request
    heap: List[Tuple[int, Tuple[int, int]]] = []  # (-next request, key), stale entries skipped
    misses = 0
    for i, key in enumerate(keys):
        if key not in cached:
            misses += call_of[i] >= count_from
            if len(cached) >= capacity:
                while True:
                    negative, victim = heapq.heappop(heap)
                    if cached.get(victim) == -negative:
                        break
                del cached[victim]
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return misses
