"""Layer-major prefill: each expert a prompt needs is read once per layer, and the state equals mlx-lm's
chunked prompt loop's (same greedy tokens, same logits)."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from conftest import record_reads
from llm_flash_moe.engine import prefill as prefill_module
from llm_flash_moe.engine.loader import load_flash_model

PROMPT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat by the door. "
          "Then the rain came down on the hills and every bird in the valley went quiet for a while. ")
CHUNK = 8  # small chunks, so that a short prompt spans many of them


def chunked_prefill(model, cache, ids, chunk=CHUNK):
    """mlx-lm's own prompt loop with ``chunk``-token steps (processes every token of ``ids``)."""
    for _ in generate_step(mx.array(ids), model, max_tokens=0, prompt_cache=cache, prefill_step_size=chunk):
        pass


def next_logits(model, cache, token):
    return model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)


def setup(models, slots=None):
    hf = models.hf("bfloat16")
    reference, tokenizer = mlx_lm.load(str(models.reference(hf)))
    flash = load_flash_model(models.prepared(hf), compute="model", prefetch=False)
    if slots is not None:
        flash.bank.min_slots = slots
        flash.bank.resize(0)
        assert flash.bank.slots == slots
    ids = tokenizer.encode(PROMPT * 2)
    assert len(ids) > 4 * CHUNK
    return reference, tokenizer, flash, ids


@pytest.mark.parametrize("slots", [None, 6])
def test_layer_major_equals_chunked_prefill_and_mlx_lm(models, slots):
    """Whole bank (every layer's experts fit) and a 6-slot bank (fewer than a layer's experts: groups)."""
    reference, tokenizer, flash, ids = setup(models, slots)
    body, last = ids[:-1], ids[-1]

    ref_cache = make_prompt_cache(reference)
    chunked_prefill(reference, ref_cache, body)
    ref = next_logits(reference, ref_cache, last)

    engine_cache = make_prompt_cache(flash.model)
    chunked_prefill(flash.model, engine_cache, body)
    chunked = next_logits(flash.model, engine_cache, last)

    flash.bank.clear()
    cache = make_prompt_cache(flash.model)
    prefill_module.layer_major_prefill(flash.model, cache, body, chunk=CHUNK)
    got = next_logits(flash.model, cache, last)

    assert mx.array_equal(chunked, ref)
    assert mx.array_equal(got, ref)
    assert int(mx.argmax(got)) == int(mx.argmax(ref))

    # and the answer after it, token for token
    ref_cache, cache = make_prompt_cache(reference), make_prompt_cache(flash.model)
    chunked_prefill(reference, ref_cache, body)
    prefill_module.layer_major_prefill(flash.model, cache, body, chunk=CHUNK)
    want = [r.token for r in mlx_lm.stream_generate(reference, tokenizer, [last], max_tokens=10,
                                                    prompt_cache=ref_cache)]
    assert len(set(want)) > 3
    assert [r.token for r in mlx_lm.stream_generate(flash.model, flash.tokenizer, [last], max_tokens=10,
                                                    prompt_cache=cache)] == want


@pytest.mark.parametrize("slots", [None, 6])
def test_each_expert_is_read_once_per_layer(models, slots):
    """The chunked loop reads an expert again in every chunk that needs it (the bank too small to keep
    the prompt's experts of every layer); the layer-major prefill reads each once per layer: exactly the
    union of the experts the prompt routes to."""
    _, _, flash, ids = setup(models, slots)
    layers = len(flash.manifest.expert_layers)
    if slots is None:  # a bank of one layer's experts: the chunked loop must evict between layers
        flash.bank.min_slots = flash.manifest.num_experts
        flash.bank.resize(0)
    reads = record_reads(flash.bank)
    cache = make_prompt_cache(flash.model)
    chunked_prefill(flash.model, cache, ids)
    chunked = sum(reads.values())
    assert max(reads.values()) > 1  # re-read by later chunks

    flash.bank.clear()
    reads.clear()
    trace = []
    flash.bank.trace = lambda layer, experts: trace.append((layer, experts.tolist()))
    cache = make_prompt_cache(flash.model)
    prefill_module.layer_major_prefill(flash.model, cache, ids, chunk=CHUNK)
    assert max(reads.values()) == 1
    union = {(layer, e) for layer, experts in trace for e in experts}
    assert set(reads) == union and len({layer for layer, _ in union}) == layers
    assert sum(reads.values()) < chunked
