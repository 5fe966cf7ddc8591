"""The bank's replacement policies on their own: which slot each gives up, never one in use."""

import numpy as np
import pytest

from llm_flash_moe.bank_policy import DecayedFrequency, LeastRecentlyUsed, make_policy


def run(policy, slots, requests, layer=0):
    """Serve ``requests`` (lists of expert ids) with ``slots`` slots; returns the misses."""
    where, owner, misses = {}, [None] * slots, 0
    for now, experts in enumerate(requests, start=1):
        experts = np.array(experts)
        hit_slots = np.array([where[e] for e in experts if e in where], dtype=np.int64)
        policy.requested(hit_slots, layer, np.array([e for e in experts if e in where], dtype=np.int64), now)
        new = [e for e in experts if e not in where]
        if new:
            victims = policy.victims(len(new), hit_slots)
            for e, v in zip(new, victims.tolist()):
                if owner[v] is not None:
                    del where[owner[v]]
                owner[v], where[e] = e, v
            policy.requested(victims, layer, np.array(new), now)
            misses += len(new)
    return misses


def test_lru_evicts_the_least_recently_used():
    policy = LeastRecentlyUsed(2, {0: 8})
    # 0, 1 fill; 0 again; 2 evicts 1 (least recent); 1 misses again, evicting 0; 2 hits
    assert run(policy, 2, [[0], [1], [0], [2], [1], [2]]) == 4


def test_decayed_frequency_keeps_a_popular_expert_that_lru_drops():
    # expert 0 is asked for every other step; a scan of new experts in between pushes it out of an LRU of 2
    requests = [[0], [1], [2], [0], [3], [4], [0], [5], [6], [0], [7], [8], [0]]
    lru = run(LeastRecentlyUsed(2, {0: 16}), 2, requests)
    decayed = run(DecayedFrequency(2, {0: 16}, half_life=64), 2, requests)
    assert lru == len(requests)  # an LRU of 2 never keeps 0 across two new experts
    assert decayed == len(requests) - 3  # once asked for twice, 0 outranks every one-off expert: 3 hits


def test_short_half_life_behaves_like_lru():
    rng = np.random.default_rng(0)
    requests = [[int(e)] for e in rng.integers(0, 16, 300)]  # one per step: no ties within a step
    assert run(DecayedFrequency(6, {0: 16}, half_life=0.01), 6, requests) == run(LeastRecentlyUsed(6, {0: 16}), 6, requests)


@pytest.mark.parametrize("name", ["lru", "decayed"])
def test_victims_are_free_slots_first_and_never_excluded(name):
    policy = make_policy(name, 6, {0: 16})
    policy.requested(np.array([0, 1, 2]), 0, np.array([5, 6, 7]), 1)
    assert sorted(policy.victims(3, np.array([], dtype=np.int64)).tolist()) == [3, 4, 5]  # free first
    policy.requested(np.array([3, 4, 5]), 0, np.array([8, 9, 10]), 2)
    chosen = policy.victims(4, np.array([0, 3]))
    assert len(set(chosen.tolist())) == 4 and not {0, 3} & set(chosen.tolist())
    with pytest.raises(RuntimeError):
        policy.victims(5, np.array([0, 3]))  # only 4 slots are not excluded


def test_a_prefetched_expert_nobody_asked_for_goes_first():
    for policy in (LeastRecentlyUsed(3, {0: 8}), DecayedFrequency(3, {0: 8})):
        policy.requested(np.array([0, 1]), 0, np.array([0, 1]), 1)
        policy.prefetched(np.array([2]), 0, np.array([5]), 1)
        assert policy.victims(1, np.array([], dtype=np.int64)).tolist() == [2]
        policy.requested(np.array([2]), 0, np.array([5]), 2)  # now asked for: it stays
        assert policy.victims(1, np.array([], dtype=np.int64)).tolist() != [2]
