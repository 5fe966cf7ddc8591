"""The benchmark's own pieces: its floors compute and read what the engine does, its statistics are right."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from llm_flash_moe.measure.benchmark import (Tokens, bank_run, count_primitives, popularity, read_records, routing_stats,
                                     with_resident_experts)
from llm_flash_moe.measure.cache_replay import horizon_misses, lru_misses, min_misses
from llm_flash_moe.engine.loader import load_flash_model


def test_routing_statistics():
    layer = [{0, 1}, {1, 2}, {2, 3}, {0, 1}]
    stats = routing_stats({0: layer}, experts_per_layer=512, recall=0.5)
    assert stats["reuse_consecutive"] == round((0.5 + 0.5 + 0.0) / 3, 3)
    assert stats["touched_over_30_tokens"] == round(4 / 512, 3)
    # an LRU of 16 entries misses each expert once (4 of 8 selections), then hits
    assert stats["lru_hit_rate"]["16"] == 0.5
    assert stats["next_layer_prediction_recall"] == 0.5


def test_lru_misses():
    calls = [(0, (1, 2)), (1, (1, 2)), (0, (1, 3)), (1, (2, 4))]
    # LRU of 3: (0,1) (0,2) (1,1) miss, (1,2) evicts (0,1)... every request misses but (1,2) at the end
    assert lru_misses(calls, 3) == 7
    assert lru_misses(calls, 3, count_from=2) == 3  # only the last two calls counted: (0,1) (0,3) (1,4)


def test_resident_floor_and_sync_floor_give_the_engine_logits(models):
    """mlx-lm's arithmetic over every expert in memory (with and without a host sync per layer) is what
    the engine computes from its bank."""
    flash = load_flash_model(models.prepared(models.hf("float32")), prefetch=False)
    ids = mx.array(flash.tokenizer.encode("The quick brown fox jumps over the lazy dog."))[None]
    streamed = flash.model(ids)
    restore = with_resident_experts(flash)
    resident = flash.model(ids)
    restore()
    assert mx.array_equal(streamed, resident)
    restore = with_resident_experts(flash, synchronize=True)
    assert mx.array_equal(flash.model(ids), streamed)
    restore()
    assert mx.array_equal(flash.model(ids), streamed)  # restored


def test_decode_times_the_router_synchronization(models):
    """Each decoded token's MoE layer times its host synchronization; a prompt's layers have none."""
    from mlx_lm.models.cache import make_prompt_cache

    flash = load_flash_model(models.prepared(models.hf("float32")))
    cache = make_prompt_cache(flash.model)
    mx.eval(flash.model(mx.array([[1, 2, 3]]), cache=cache))
    assert flash.bank.stats.router_launch_seconds == flash.bank.stats.router_wait_seconds == 0
    before = replace(flash.bank.stats)
    mx.eval(flash.model(mx.array([[4]]), cache=cache))
    during = flash.bank.stats.since(before)
    assert during.router_launch_seconds > 0 and during.router_wait_seconds > 0


def test_read_records_reads_the_given_records(models, monkeypatch):
    """The I/O floor reads exactly the records it is given, each call's in parallel."""
    import os

    prepared = models.prepared(models.hf("float32"))
    flash = load_flash_model(prepared)
    size = flash.manifest.expert_layers[0].layout.record_size
    seen = []
    real = os.preadv

    def spy(fd, buffers, offset):
        seen.append((os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1], offset))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    calls = [(layer.layer, (0, 3)) for layer in flash.manifest.expert_layers]
    assert read_records(prepared, flash.manifest, calls, threads=2) > 0
    expected = {(layer.file.rsplit("/", 1)[1], e * size) for layer in flash.manifest.expert_layers for e in (0, 3)}
    assert sorted(seen) == sorted(expected)


def test_bank_run_counts_reads_against_lru_and_min_on_the_same_requests(models):
    """A partial bank's figures are of the timed new tokens after a warm-up in the same stream; LRU and MIN
    are replayed on the requests the engine made (recorded here independently)."""
    from llm_flash_moe.bank import expert_bank

    prepared = models.prepared(models.hf("float32"))
    calls = []
    real = expert_bank.ExpertBank.lookup

    def recording(self, layer, experts, prefetch=None):
        calls.append((layer, tuple(int(e) for e in experts)))
        return real(self, layer, experts, prefetch)

    expert_bank.ExpertBank.lookup = recording
    try:
        run = bank_run(prepared, k=2, fraction=0.4, warmup=list(range(10, 16)), timed=list(range(16, 28)),
                       read_threads=2, cold=False, prefetch=False)
    finally:
        expert_bank.ExpertBank.lookup = real
    flash = load_flash_model(prepared)
    layers = len(flash.manifest.expert_layers)
    everything = sum(l.num_experts for l in flash.manifest.expert_layers)
    assert run.bank_slots == int(0.4 * everything) and run.timed_tokens == 12 and run.warmup_tokens == 6
    warm = 6 * layers
    lru, best = lru_misses(calls, run.bank_slots, count_from=warm), min_misses(calls, run.bank_slots, count_from=warm)
    assert run.lru_records_per_token == round(lru / 12, 2) and run.min_records_per_token == round(best / 12, 2)
    assert 0 < best <= lru
    # without reading ahead, the bank's policy is the only difference from LRU on these requests
    record = flash.manifest.expert_layers[0].layout.record_size
    reads = run.bytes_read_per_token * 12 / record
    assert reads == round(reads) > 0 and run.records_read_per_token == round(reads / 12, 2)
    assert run.vs_lru == round(reads / lru, 3)


def test_min_reads_no_more_than_any_cache_and_exactly_beladys_choice():
    """MIN against every eviction order on small traces: it is the minimum (brute force)."""
    import random

    def best_possible(keys, capacity):
        @__import__("functools").lru_cache(maxsize=None)
        def go(i, cached):
            if i == len(keys):
                return 0
            if keys[i] in cached:
                return go(i + 1, cached)
            if len(cached) < capacity:
                return 1 + go(i + 1, cached | {keys[i]})
            return 1 + min(go(i + 1, (cached - {v}) | {keys[i]}) for v in cached)
        return go(0, frozenset())

    rng = random.Random(0)
    for _ in range(30):
        keys = [rng.randrange(6) for _ in range(14)]
        calls = [(0, (e,)) for e in keys]
        for capacity in (1, 2, 3):
            assert min_misses(calls, capacity) == best_possible(tuple(keys), capacity)
            assert min_misses(calls, capacity) <= lru_misses(calls, capacity)


def test_a_horizon_of_nothing_is_lru_and_any_horizon_lies_between_lru_and_min():
    rng = np.random.default_rng(1)
    calls = [(int(rng.integers(0, 3)), tuple(int(e) for e in rng.choice(12, 2, replace=False))) for _ in range(200)]
    for capacity in (3, 5, 9):
        lru, best = lru_misses(calls, capacity, count_from=20), min_misses(calls, capacity, count_from=20)
        assert horizon_misses(calls, capacity, 0, count_from=20) == lru
        for horizon in (1, 4, 8, len(calls)):  # knowing some of the future helps, never beyond MIN
            assert best <= horizon_misses(calls, capacity, horizon, count_from=20) < lru


def test_tokens_are_never_handed_out_twice():
    supply = Tokens()
    seen = supply.take(100) + supply.take(50)
    assert len(set(seen)) == 150


def test_popularity_gini_and_top_share():
    assert popularity([{0}, {1}, {2}, {3}, {4}], 5) == (0.0, 0.2)  # uniform
    gini, top = popularity([{0}] * 9 + [{1}], 10)
    assert gini == pytest.approx((2 * 10 - 11) * 9 / (10 * 10) + (2 * 9 - 11) * 1 / (10 * 10)) and top == 1.0


def test_count_primitives_skips_views():
    a = mx.ones((4, 4))
    mx.eval(a)
    names = count_primitives((a.reshape(16) * 2).sum())
    assert names == ["Multiply", "Sum"] or sorted(names) == ["Multiply", "Sum"]
