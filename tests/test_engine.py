"""The streaming engine against mlx-lm run on the same quantized weights loaded whole."""

from __future__ import annotations

import json
from dataclasses import replace
import struct
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from llm_flash_moe.engine import load_flash_model
from llm_flash_moe.errors import FlashMoeError
from llm_flash_moe.flash_layout import FORMAT_VERSION, MANIFEST_NAME, Manifest
from llm_flash_moe.mlx_model import moe_blocks

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def greedy_tokens(model, tokenizer, prompt_ids, n=12):
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt_ids, max_tokens=n)]


def relative_error(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.max(mx.abs(a - b)) / mx.max(mx.abs(b)))


def pair(models, dtype="bfloat16", bits=4, model_type="qwen3_5_moe", **load):
    layout = "fused" if model_type == "qwen3_5_moe" else "per_expert"
    hf = models.hf(dtype, layout=layout, model_type=model_type)
    reference, tokenizer = mlx_lm.load(str(models.reference(hf, bits=bits)))
    flash = load_flash_model(models.prepared(hf, bits=bits), **load)
    return reference, tokenizer, flash


@pytest.mark.parametrize("dtype,bits", [("float32", 4), ("bfloat16", 2), ("bfloat16", 4), ("bfloat16", 8)])
def test_tokens_and_logits_identical_to_mlx_lm(models, dtype, bits):
    reference, tokenizer, flash = pair(models, dtype, bits, compute="model")
    ids = tokenizer.encode(PROMPT)
    ref_logits = reference(mx.array(ids)[None])
    assert relative_error(flash.model(mx.array(ids)[None]), ref_logits) <= 1e-4
    ref_tokens = greedy_tokens(reference, tokenizer, ids)
    assert len(set(ref_tokens)) > 3  # a real test: the model does not just repeat one token
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == ref_tokens


def test_fp32_activations_on_fp32_weights_identical(models):
    """The CPU default (fp32 expert activations) is exact when the model itself is fp32."""
    reference, tokenizer, flash = pair(models, "float32", 4)
    ids = tokenizer.encode(PROMPT)
    assert relative_error(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None])) <= 1e-4
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == greedy_tokens(reference, tokenizer, ids)


def test_cpu_default_runs_in_float32_like_mlx_lm_cast_to_float32(models):
    """On the CPU the default computes in fp32 (10x faster there); it equals mlx-lm's model cast to fp32."""
    from llm_flash_moe.mlx_model import cast_floats

    reference, tokenizer, flash = pair(models, "bfloat16", 4)
    cast_floats(reference, mx.float32)
    ids = tokenizer.encode(PROMPT)
    logits = flash.model(mx.array(ids)[None])
    assert logits.dtype == mx.float32
    assert relative_error(logits, reference(mx.array(ids)[None])) <= 1e-4
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == greedy_tokens(reference, tokenizer, ids)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_other_model_types_identical(models, model_type):
    reference, tokenizer, flash = pair(models, model_type=model_type, compute="model")
    ids = tokenizer.encode(PROMPT)
    assert relative_error(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None])) <= 1e-4
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == greedy_tokens(reference, tokenizer, ids)


@pytest.mark.parametrize("k", [1, 5])
def test_experts_per_token_is_a_runtime_setting(models, k):
    reference, tokenizer, flash = pair(models, compute="model")
    for _, block in moe_blocks(reference):
        block.top_k = k  # mlx-lm with num_experts_per_tok = k
    flash.set_experts_per_token(k)
    ids = tokenizer.encode(PROMPT)
    assert relative_error(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None])) <= 1e-4
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == greedy_tokens(reference, tokenizer, ids)
    with pytest.raises(FlashMoeError):
        flash.set_experts_per_token(flash.manifest.num_experts + 1)


class RoutingRecorder:
    """Wraps mlx-lm's own switch_mlp to record which experts its router chose, per layer."""

    def __init__(self, model):
        self.chosen = {}
        for index, block in moe_blocks(model):
            block.switch_mlp = self._wrap(index, block.switch_mlp)

    def _wrap(self, index, inner):
        def call(x, indices):
            self.chosen[index] = np.unique(np.array(indices))
            return inner(x, indices)
        return call

    def distinct(self) -> int:
        return sum(len(v) for v in self.chosen.values())


def test_reads_exactly_the_records_the_router_chose(models):
    """Without speculative prefetch, exactly the chosen records are read (prefetch's extra reads are
    accounted in test_prefetch_changes_reads_not_results)."""
    reference, tokenizer, flash = pair(models, compute="model", prefetch=False)
    recorder = RoutingRecorder(reference)
    record_size = flash.manifest.expert_layers[0].layout.record_size
    ids = tokenizer.encode(PROMPT)
    ref_cache, cache = make_prompt_cache(reference), make_prompt_cache(flash.model)

    # A prompt chunk: every distinct expert the chunk needs is read once, not once per token.
    before = flash.store.stats.bytes_read
    logits = flash.model(mx.array(ids)[None], cache=cache)
    reference(mx.array(ids)[None], cache=ref_cache)
    assert flash.store.stats.bytes_read - before == recorder.distinct() * record_size

    # One decoded token (cold: no in-memory cache): (distinct experts) x (record size), never whole files.
    token = mx.argmax(logits[:, -1], axis=-1)[:, None]
    before, reads = flash.store.stats.bytes_read, flash.store.stats.reads
    flash.model(token, cache=cache)
    reference(token, cache=ref_cache)
    read = flash.store.stats.bytes_read - before
    k = flash.experts_per_token
    assert read == recorder.distinct() * record_size == len(recorder.chosen) * k * record_size
    assert flash.store.stats.reads - reads == len(recorder.chosen) * k
    assert read <= flash.manifest.expert_bytes * k // flash.manifest.num_experts  # k of E records per layer


def test_resident_weights_are_the_only_weights_in_memory(models):
    _, _, flash = pair(models, compute="model")  # as stored (the CPU default widens bf16 scales to fp32)
    path = flash.directory / "model.safetensors"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    tensor_bytes = path.stat().st_size - 8 - header_len
    assert flash.resident_bytes() == tensor_bytes
    num_experts = flash.manifest.num_experts
    from mlx.utils import tree_flatten
    for key, value in tree_flatten(flash.model.parameters()):
        assert "switch_mlp" not in key and not (value.ndim == 3 and value.shape[0] == num_experts), key


def test_more_distinct_experts_than_buffer_slots(models):
    """With fewer slots than distinct experts a chunk runs in groups; the result does not change."""
    hf = models.hf("float32")
    prepared = models.prepared(hf)
    whole = load_flash_model(prepared)
    grouped = load_flash_model(prepared, slots=3)
    ids = mx.array(whole.tokenizer.encode(PROMPT))[None]
    assert relative_error(grouped.model(ids), whole.model(ids)) <= 1e-5
    assert grouped.store.stats.reads == whole.store.stats.reads


def test_in_memory_cache_serves_repeated_experts(models):
    hf = models.hf("float32")
    flash = load_flash_model(models.prepared(hf), cache_bytes=1 << 30)
    ids = mx.array(flash.tokenizer.encode(PROMPT))[None]
    first = flash.model(ids)
    read_once = flash.store.stats.bytes_read
    second = flash.model(ids)
    assert flash.store.stats.bytes_read == read_once  # nothing read again
    assert flash.store.stats.cache_hits > 0 and flash.store.stats.hit_rate > 0
    assert mx.array_equal(first, second)
    flash.store.set_cache_bytes(0)
    flash.model(ids)
    assert flash.store.stats.bytes_read == 2 * read_once


def test_small_cache_evicts_least_recently_used_and_keeps_results(models):
    prepared = models.prepared(models.hf("float32"))
    plain = load_flash_model(prepared)
    layout = plain.manifest.expert_layers[0].layout
    small = load_flash_model(prepared, cache_bytes=3 * layout.parts_bytes)  # three records
    ids = mx.array(plain.tokenizer.encode(PROMPT))[None]
    expected = plain.model(ids)
    for _ in range(2):
        assert mx.array_equal(small.model(ids), expected)
    stats = small.store.stats
    assert stats.reads > plain.store.stats.reads  # records evicted and read again
    assert stats.reads + stats.cache_hits == 2 * plain.store.stats.reads


def copy_model(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_damaged_files_stop_with_one_line(models, tmp_path):
    prepared = models.prepared(models.hf("bfloat16"))
    layer_file = Manifest.load(prepared).expert_layers[1].file

    truncated = copy_model(prepared, tmp_path / "truncated")
    with open(truncated / layer_file, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(FlashMoeError, match="layer-001.bin has 1,000 bytes"):
        load_flash_model(truncated)

    missing = copy_model(prepared, tmp_path / "missing")
    (missing / layer_file).unlink()
    with pytest.raises(FlashMoeError, match="missing"):
        load_flash_model(missing)

    newer = copy_model(prepared, tmp_path / "newer")
    manifest = json.loads((newer / MANIFEST_NAME).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (newer / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FlashMoeError, match="newer than this plugin"):
        load_flash_model(newer)


def test_prefetch_changes_reads_not_results(models):
    """Predicting the next layer's experts overlaps reads with compute; the output is the same, and the
    store accounts for every prediction (hits + misses = records needed; wasted reads are counted)."""
    from mlx_lm.models.cache import make_prompt_cache

    prepared = models.prepared(models.hf("float32"))
    plain = load_flash_model(prepared, prefetch=False)
    ahead = load_flash_model(prepared, prefetch=True)
    ids = plain.tokenizer.encode(PROMPT)
    assert greedy_tokens(ahead.model, ahead.tokenizer, ids) == greedy_tokens(plain.model, plain.tokenizer, ids)
    stats = ahead.store.stats
    assert stats.prefetch_hits > 0 and stats.prefetch_hits + stats.prefetch_misses > 0
    moe_layers = len(ahead.manifest.expert_layers)
    k = ahead.experts_per_token
    cache = make_prompt_cache(ahead.model)
    ahead.model(mx.array(ids)[None], cache=cache)  # prompt chunk: no prediction
    token = mx.array([[ids[-1]]])
    mid = replace(ahead.store.stats)
    mx.eval(ahead.model(token, cache=cache))
    delta = ahead.store.stats.since(mid)
    assert delta.prefetch_hits + delta.prefetch_misses == (moe_layers - 1) * k  # every layer but the first
    assert delta.reads == moe_layers * k + delta.prefetch_wasted  # a prediction read for nothing is counted
    assert delta.bytes_read == delta.reads * ahead.manifest.expert_layers[0].layout.record_size


class HostCopies:
    """DeviceCopies' contract (pin, unpin, copy) with memmove: runs the CUDA staging path on the CPU."""

    def __init__(self):
        self.pinned, self.copied = set(), []

    def pin(self, address, nbytes):
        self.pinned.add(address)

    def unpin(self, address):
        self.pinned.remove(address)

    def copy(self, pairs):
        import ctypes

        for dst, src, nbytes in pairs:
            ctypes.memmove(dst, src, nbytes)
            self.copied.append(nbytes)


def test_staged_copies_give_the_same_results(models, monkeypatch):
    """CUDA's path (reads land in staging, each record is copied into the arrays the matmuls read)
    gives what reading into those arrays gives, with prefetch, cache hits and prompt chunks; every record
    read is copied whole into its slot and into the cache, and every cache hit from the cache into its slot."""
    from llm_flash_moe import expert_store

    prepared = models.prepared(models.hf("float32"))
    direct = load_flash_model(prepared)
    copies = HostCopies()
    monkeypatch.setattr(expert_store, "device_copies", lambda: copies)
    staged = load_flash_model(prepared, cache_bytes=1 << 30)
    ids = direct.tokenizer.encode(PROMPT)
    assert mx.array_equal(staged.model(mx.array(ids)[None]), direct.model(mx.array(ids)[None]))
    assert greedy_tokens(staged.model, staged.tokenizer, ids) == greedy_tokens(direct.model, direct.tokenizer, ids)
    stats = staged.store.stats
    assert stats.cache_hits > 0 and stats.prefetch_hits > 0
    record = staged.manifest.expert_layers[0].layout
    assert sum(copies.copied) == (2 * stats.reads + stats.cache_hits) * record.parts_bytes
    assert len(copies.pinned) == 2  # one staging area per buffer set (two sets: alternate layers)
    staged.close()
    assert not copies.pinned
