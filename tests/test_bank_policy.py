"""The bank's replacement policies: which slot each gives up, never one in use; and the bank itself replayed
on a fresh-token routing trace against LRU of the same capacity."""

import numpy as np
import pytest

from llm_flash_moe.bank.bank_policy import LeastRecentlyUsed, RouterLikelihood, make_policy
from llm_flash_moe.measure.cache_replay import lru_misses


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


def test_router_likelihood_evicts_what_the_router_rates_lowest_not_the_least_recent():
    policy = RouterLikelihood(3, {0: 8})
    policy.observe(0, np.array([0.5, 0.05, 0.3, 0, 0, 0, 0, 0.15]))
    policy.requested(np.array([0, 1, 2]), 0, np.array([0, 1, 2]), 1)  # 0 and 2 rated high, 1 low
    policy.requested(np.array([0]), 0, np.array([0]), 2)
    assert policy.victims(1, np.array([], dtype=np.int64)).tolist() == [1]  # LRU would give up 1 too...
    policy.requested(np.array([1]), 0, np.array([1]), 3)  # ...but after 1 is asked for again, LRU gives up 2
    assert policy.victims(1, np.array([], dtype=np.int64)).tolist() == [1]  # the router still rates 1 lowest
    # the rating follows the router, with weight MEMORY on the past
    policy.observe(0, np.array([0, 0.9, 0, 0, 0, 0, 0, 0.1]))
    assert policy.victims(1, np.array([], dtype=np.int64)).tolist() == [2]


def test_without_router_observations_it_is_lru():
    rng = np.random.default_rng(0)
    requests = [[int(e)] for e in rng.integers(0, 16, 300)]
    assert run(RouterLikelihood(6, {0: 16}), 6, requests) == run(LeastRecentlyUsed(6, {0: 16}), 6, requests)


@pytest.mark.parametrize("name", ["lru", "likelihood"])
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
    for policy in (LeastRecentlyUsed(3, {0: 8}), RouterLikelihood(3, {0: 8})):
        policy.requested(np.array([0, 1]), 0, np.array([0, 1]), 1)
        policy.prefetched(np.array([2]), 0, np.array([5]), 1)
        assert policy.victims(1, np.array([], dtype=np.int64)).tolist() == [2]
        policy.requested(np.array([2]), 0, np.array([5]), 2)  # now asked for: it stays
        assert policy.victims(1, np.array([], dtype=np.int64)).tolist() != [2]


def fresh_token_trace(tokens, layers, experts, k, seed=0):
    """Routing of ``tokens`` new tokens, built as the bench's synthetic model shapes it: each token's hidden
    state mixes a slow walk (consecutive tokens route alike) with fresh noise, each expert has a popularity
    (some are chosen far more often), each layer scales the state its own way; returns per token and layer
    the chosen experts and the router's softmax over all experts."""
    rng = np.random.default_rng(seed)
    hidden = 256
    shared = rng.standard_normal(hidden)
    walk = np.empty((tokens, hidden))
    walk[0] = rng.standard_normal(hidden)
    for t in range(1, tokens):
        walk[t] = 0.9 * walk[t - 1] + np.sqrt(1 - 0.81) * rng.standard_normal(hidden)
    x = np.sqrt(0.5) * walk + np.sqrt(0.5) * rng.standard_normal((tokens, hidden)) + 0.3 * shared
    chosen = np.empty((tokens, layers, k), dtype=np.int64)
    softmax = np.empty((tokens, layers, experts))
    for layer in range(layers):
        router = (rng.standard_normal((experts, hidden)) + np.outer(1.5 * rng.standard_normal(experts), shared) / 16) / 16
        logits = (x * (1 + 0.25 * rng.standard_normal(hidden))) @ router.T
        chosen[:, layer] = np.argpartition(-logits, k, axis=1)[:, :k]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        softmax[:, layer] = z / z.sum(axis=1, keepdims=True)
    return chosen, softmax


@pytest.mark.parametrize("k,share", [(4, 0.14), (4, 0.25), (10, 0.14), (10, 0.25)])
def test_the_bank_reads_no_more_than_lru_on_new_tokens(models, k, share):
    """The real ExpertBank (its table, victims and policy; records of a tiny model read for real) serving a
    fresh-token routing trace of 4 layers x 128 experts, as the engine serves it by default (its router's
    softmax observed, no read-ahead in a partial bank), reads no more records after a warm-up than LRU of
    the same capacity on the same requests; read-ahead on every call would read more (why it is off there)."""
    from llm_flash_moe.engine.loader import load_flash_model

    prepared = models.prepared(models.hf("float32", num_experts=128, num_experts_per_tok=4))
    tokens, warm = 240, 60
    chosen, softmax = fresh_token_trace(tokens, 4, 128, k)
    reads = {}
    for read_ahead in (False, True):
        flash = load_flash_model(prepared)
        bank = flash.bank
        bank.min_slots = int(share * 4 * 128)
        bank.resize(0)
        calls = []
        for t in range(tokens):
            if t == warm:
                before = bank.stats.reads
            for layer in range(4):
                experts = chosen[t, layer]
                calls.append((layer, tuple(experts.tolist())))
                ahead = None
                if read_ahead and layer < 3:  # the next layer's choice, half of it guessed right
                    guess = np.concatenate([chosen[t, layer + 1][: k // 2], (chosen[t, layer + 1][k // 2:] + 7) % 128])
                    ahead = (layer + 1, guess, len(guess))
                bank.observe(layer, softmax[t, layer])  # as the MoE block does with its router's softmax
                bank.lookup(layer, experts, prefetch=ahead)
        reads[read_ahead] = bank.stats.reads - before
        flash.close()
    lru = lru_misses(calls, int(share * 4 * 128), count_from=warm * 4)
    assert reads[False] <= lru
    assert reads[True] > reads[False]
