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


def lru_misses(calls: List[Call], capacity: int, count_from: int = 0) -> int:
    """Misses of an LRU of ``capacity`` entries over ``calls``, counted from call number ``count_from`` on."""
    cache: OrderedDict = OrderedDict()
    misses = 0
    for i, (layer, experts) in enumerate(calls):
        keys = [(layer, e) for e in experts]
        for key in keys:  # a call's hits first, as the bank serves them: none of them is then a victim
            if key in cache:
                cache.move_to_end(key)
        for key in keys:
            if key in cache:
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


def horizon_misses(calls: List[Call], capacity: int, horizon: int, count_from: int = 0) -> int:
    """Misses of a cache that knows the requests of the next ``horizon`` calls and nothing further: it evicts
    the least recently used of the entries not requested within them (when every entry is, the one
    requested furthest ahead). ``horizon`` 0 is LRU; a horizon past the trace's end is MIN. Replayed with
    horizons of one and several tokens, it shows how much any predictor of the next tokens' routing could
    gain over LRU, and how much of MIN's gain needs knowledge of the far future."""
    never = len(calls)
    upcoming: List[Dict[Tuple[int, int], int]] = [{} for _ in calls]  # per call: its keys' next call
    last: Dict[Tuple[int, int], int] = {}
    for i in range(len(calls) - 1, -1, -1):
        layer, experts = calls[i]
        for e in experts:
            key = (layer, int(e))
            upcoming[i][key] = last.get(key, never)
        for key in upcoming[i]:
            last[key] = i
    cached: Dict[Tuple[int, int], Tuple[int, int]] = {}  # key -> (last request's order, next call)
    order, misses = 0, 0
    for i, nexts in enumerate(upcoming):
        for key, then in nexts.items():  # the call's hits first, as the bank serves them
            if key in cached:
                order += 1
                cached[key] = (order, then)
        for key, then in nexts.items():
            if key in cached:
                continue
            misses += i >= count_from
            if len(cached) >= capacity:
                far = [(seen, victim) for victim, (seen, ahead) in cached.items() if ahead > i + horizon]
                victim = min(far)[1] if far else max(cached.items(), key=lambda item: item[1][1])[0]
                del cached[victim]
            order += 1
            cached[key] = (order, then)
    return misses
