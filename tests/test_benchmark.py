"""The benchmark's own pieces: its floors compute and read what the engine does, its statistics are right."""

import mlx.core as mx

from llm_flash_moe.benchmark import (Trace, io_floor_ms, project_decode_ms, routing_stats, warm_time_split,
                                     with_resident_experts)
from llm_flash_moe.engine import load_flash_model


def test_routing_statistics():
    layer = [{0, 1}, {1, 2}, {2, 3}, {0, 1}]
    stats = routing_stats({0: layer})
    assert stats["reuse_consecutive"] == round((0.5 + 0.5 + 0.0) / 3, 3)
    assert stats["touched_over_30_tokens"] == round(4 / 512, 3)
    # an LRU of 16 entries misses each expert once (4 of 8 selections), then hits
    assert stats["lru_hit_rate"]["16"] == 0.5


def test_compute_floor_runs_the_engine_arithmetic(models):
    """The compute floor (experts held in memory, mlx-lm's SwitchGLU) gives the engine's logits exactly."""
    flash = load_flash_model(models.prepared(models.hf("float32")), prefetch=False)
    ids = mx.array(flash.tokenizer.encode("The quick brown fox jumps over the lazy dog."))[None]
    streamed = flash.model(ids)
    layers = {l.layer: list(range(l.num_experts)) for l in flash.manifest.expert_layers}
    restore = with_resident_experts(flash, layers)
    resident = flash.model(ids)
    restore()
    assert mx.array_equal(streamed, resident)
    restore = with_resident_experts(flash, layers, synchronize=True)  # the sync floor: same arithmetic
    assert mx.array_equal(flash.model(ids), streamed)
    restore()
    assert mx.array_equal(flash.model(ids), streamed)  # restored


def test_decode_times_the_router_synchronization(models):
    """Each decoded token's MoE layer times its host synchronization; a prompt's layers have none."""
    from dataclasses import replace

    from mlx_lm.models.cache import make_prompt_cache

    flash = load_flash_model(models.prepared(models.hf("float32")))
    cache = make_prompt_cache(flash.model)
    mx.eval(flash.model(mx.array([[1, 2, 3]]), cache=cache))
    assert flash.store.stats.router_launch_seconds == flash.store.stats.router_wait_seconds == 0
    before = replace(flash.store.stats)
    mx.eval(flash.model(mx.array([[4]]), cache=cache))
    during = flash.store.stats.since(before)
    assert during.router_launch_seconds > 0 and during.router_wait_seconds > 0
    split = warm_time_split(10.0, during, tokens=1)
    assert split["other"] == round(10.0 - 1000 * (during.read_seconds + during.router_launch_seconds
                                                  + during.router_wait_seconds), 2)


def test_io_floor_reads_the_given_records(models):
    prepared = models.prepared(models.hf("float32"))
    flash = load_flash_model(prepared)
    calls = [(layer.layer, (0, 1)) for layer in flash.manifest.expert_layers]
    assert io_floor_ms(prepared, flash.manifest, calls, tokens=1, threads=2) > 0


def test_agreement_of_logits():
    import numpy as np

    from llm_flash_moe.benchmark import agreement

    reference = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    engine = np.array([[0.0, 2.0, 1.5], [0.5, 4.0, 1.0]])  # second token's top choice differs
    result = agreement(engine, reference)
    assert result["top1_agreement"] == 0.5
    assert result["max_abs_diff_vs_max_abs"] == 4.0 / 3.0


def test_projection_counts_the_first_layer_extra_wait_once():
    class Store:
        def load(self, layer, experts):
            return layer

    trace = Trace(Store())
    trace.calls = [(3, (0,)), (5, (1,)), (7, (2,))] * 2  # two tokens over three MoE layers
    trace.seconds = [0.004, 0.001, 0.003] * 2  # the first layer (3) waits 4 ms, the others 2 ms on average
    assert abs(trace.first_layer_extra_ms(tokens=2) - 2.0) < 1e-9
    # 10 ms/token over 4 layers with 1 ms outside them and 2 ms of first-layer extra: 1.75 ms a typical layer
    assert project_decode_ms(10.0, head=1.0, first_layer_extra=2.0, layers=4) == 1.0 + 2.0 + 60 * 1.75
