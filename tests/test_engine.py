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

from llm_flash_moe.engine.loader import load_flash_model
from llm_flash_moe.errors import FlashMoeError
from llm_flash_moe.flash_layout import FORMAT_VERSION, MANIFEST_NAME, Manifest
from llm_flash_moe.engine.mlx_model import moe_blocks

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
    assert relative_error(flash.model(mx.array(ids)[None]), ref_logits) == 0.0
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
    from llm_flash_moe.engine.mlx_model import cast_floats

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
    assert relative_error(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None])) == 0.0
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == greedy_tokens(reference, tokenizer, ids)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_experts_per_token_is_a_runtime_setting(models, k):
    reference, tokenizer, flash = pair(models, compute="model")
    for _, block in moe_blocks(reference):
        block.top_k = k  # mlx-lm with num_experts_per_tok = k
    flash.set_experts_per_token(k)
    ids = tokenizer.encode(PROMPT)
    assert relative_error(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None])) == 0.0
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
    """A cold bank reads exactly the chosen records (without speculative prefetch); once they are in the
    bank, asking for them again reads nothing."""
    reference, tokenizer, flash = pair(models, compute="model", prefetch=False)
    recorder = RoutingRecorder(reference)
    record_size = flash.manifest.expert_layers[0].layout.record_size
    ids = tokenizer.encode(PROMPT)
    ref_cache, cache = make_prompt_cache(reference), make_prompt_cache(flash.model)

    # A prompt chunk: every distinct expert the chunk needs is read once, not once per token.
    before = flash.bank.stats.bytes_read
    logits = flash.model(mx.array(ids)[None], cache=cache)
    reference(mx.array(ids)[None], cache=ref_cache)
    assert flash.bank.stats.bytes_read - before == recorder.distinct() * record_size

    # One decoded token: only the chosen experts the bank does not hold yet are read, never whole files.
    held = {layer: set(recorder.chosen[layer].tolist()) for layer in recorder.chosen}
    token = mx.argmax(logits[:, -1], axis=-1)[:, None]
    before = replace(flash.bank.stats)
    flash.model(token, cache=cache)
    reference(token, cache=ref_cache)
    during = flash.bank.stats.since(before)
    k = flash.experts_per_token
    new = sum(len(set(recorder.chosen[layer].tolist()) - held[layer]) for layer in recorder.chosen)
    assert during.requested == len(recorder.chosen) * k and during.hits == during.requested - new
    assert during.bytes_read == new * record_size and during.reads == new

    # The same prompt again: every expert is in the bank, nothing is read.
    before = replace(flash.bank.stats)
    assert mx.array_equal(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None]))
    during = flash.bank.stats.since(before)
    assert during.reads == 0 and during.hits == during.requested == recorder.distinct()


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


@pytest.mark.parametrize("piece", [None, 1000])
def test_a_thrashed_bank_still_equals_mlx_lm(models, monkeypatch, piece):
    """A bank of 6 slots for 4 layers of 8 experts (fewer than a layer's distinct experts in a prompt, so
    chunks run in groups, and fewer than the experts a few tokens use, so experts are evicted and read
    again), prefetch on, over a prompt, its answer and a follow-up turn: greedy tokens and logits stay
    mlx-lm's exactly; also with records read in pieces of 1000 bytes (cut inside parts and padding)."""
    from llm_flash_moe.bank import bank_pool

    if piece:
        monkeypatch.setattr(bank_pool, "READ_PIECE_BYTES", piece)
    hf = models.hf("bfloat16")
    reference, tokenizer = mlx_lm.load(str(models.reference(hf)))
    layout = Manifest.load(models.prepared(hf)).expert_layers[0].layout
    flash = small_bank(load_flash_model(models.prepared(hf), compute="model", prefetch=True), 6)
    ids = tokenizer.encode(PROMPT)
    ref_cache, cache = make_prompt_cache(reference), make_prompt_cache(flash.model)
    for turn in (ids, tokenizer.encode(" And then the dog woke up and")):
        ref = [r.token for r in mlx_lm.stream_generate(reference, tokenizer, turn, max_tokens=8, prompt_cache=ref_cache)]
        got = [r.token for r in mlx_lm.stream_generate(flash.model, flash.tokenizer, turn, max_tokens=8,
                                                       prompt_cache=cache)]
        assert got == ref
    assert mx.array_equal(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None]))
    stats = flash.bank.stats
    assert stats.misses > flash.manifest.num_experts * len(flash.manifest.expert_layers)  # evicted, read again
    assert stats.prefetch_reads > 0 and stats.hits > 0
    pieces = len(flash.bank._pools[0].pieces)
    assert pieces == (-(-layout.record_size // piece) if piece else 1) and (pieces > 2 or not piece)


def test_bank_survives_a_resize_and_reports_its_size(models):
    prepared = models.prepared(models.hf("float32"))
    flash = load_flash_model(prepared, bank_bytes=1 << 30)
    manifest = flash.manifest
    everything = sum(l.num_experts for l in manifest.expert_layers)
    assert flash.bank.slots == everything  # a large budget holds every expert, no more
    assert flash.bank.nbytes == everything * manifest.expert_layers[0].layout.parts_bytes
    ids = mx.array(flash.tokenizer.encode(PROMPT))[None]
    expected = flash.model(ids)
    assert flash.bank.held() > 0
    flash.set_bank_bytes(0)  # the smallest bank: twice the model's experts per token
    assert flash.bank.slots == 2 * manifest.experts_per_token and flash.bank.held() == 0
    assert mx.array_equal(flash.model(ids), expected)


def test_pending_output_is_evaluated_before_its_slots_are_refilled(models):
    """An output still unevaluated when the bank refills the slots it reads is evaluated first."""
    prepared = models.prepared(models.hf("float32"))
    reference = load_flash_model(prepared)
    flash = small_bank(load_flash_model(prepared), 2)
    cache, ref_cache = make_prompt_cache(flash.model), make_prompt_cache(reference.model)
    ids = mx.array(flash.tokenizer.encode(PROMPT))[None]
    mx.eval(flash.model(ids, cache=cache), reference.model(ids, cache=ref_cache))
    lazy = flash.model(mx.array([[5]]), cache=cache)  # decoded lazily; its last layer is not evaluated
    layer = max(flash.bank.layers)
    slots_before = flash.bank._owner[flash.bank._pool_of[layer]].copy()
    flash.bank.lookup(layer, np.array([e for e in range(flash.manifest.num_experts)
                                       if e not in slots_before[:, 1]][:2]))  # refills both slots
    assert mx.array_equal(lazy, reference.model(mx.array([[5]]), cache=ref_cache))


def resident_pages(path: Path, offset: int, length: int) -> int:
    """Pages of ``path`` in [offset, offset + length) that the OS page cache holds (Linux mincore)."""
    import ctypes
    import mmap
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset)
    finally:
        os.close(fd)
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    view = np.frombuffer(m, dtype=np.uint8)
    assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(length), vec) == 0
    del view
    m.close()
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="Linux page cache control")
def test_records_in_the_bank_are_not_also_in_the_page_cache(models, tmp_path):
    """One cache, not two: what the bank read is dropped from the OS page cache (unified memory / CPU)."""
    import mmap

    from llm_flash_moe.bank.bank_pool import drop_from_page_cache as evict

    prepared = copy_model(models.prepared(models.hf("float32")), tmp_path / "m")
    flash = load_flash_model(prepared, prefetch=False)
    assert flash.bank.drop_page_cache
    files = [prepared / l.file for l in flash.manifest.expert_layers]
    evict(files)
    size = flash.manifest.expert_layers[0].layout.record_size
    first = flash.manifest.expert_layers[0]
    with open(prepared / first.file, "rb") as f:  # a plain read does fill the page cache
        f.read(size)
    assert resident_pages(prepared / first.file, 0, size) == -(-size // mmap.PAGESIZE)
    evict(files)
    flash.model(mx.array(flash.tokenizer.encode(PROMPT))[None])
    read = [(l, e) for l in flash.bank.layers for e in np.nonzero(flash.bank._slot_of[l] >= 0)[0]]
    assert read
    for layer, expert in read:
        assert resident_pages(prepared / flash.bank.layers[layer].file, int(expert) * size, size) == 0
    for path in files:  # nor any other record: no readahead behind the bank's back
        assert resident_pages(path, 0, path.stat().st_size) == 0


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


def small_bank(flash, slots: int):
    flash.bank.min_slots = slots
    flash.bank.resize(0)
    assert flash.bank.slots == slots
    return flash


def test_prefetch_changes_reads_not_results(models):
    """Predicting the next layer's experts overlaps reads with compute; the output is the same, and the
    bank accounts for every prediction (a bank of 12 of the 32 experts, so predictions are often missing)."""
    from mlx_lm.models.cache import make_prompt_cache

    prepared = models.prepared(models.hf("float32"))
    plain = small_bank(load_flash_model(prepared, prefetch=False), 12)
    ahead = small_bank(load_flash_model(prepared, prefetch=True), 12)
    ids = plain.tokenizer.encode(PROMPT)
    assert greedy_tokens(ahead.model, ahead.tokenizer, ids) == greedy_tokens(plain.model, plain.tokenizer, ids)
    stats = ahead.bank.stats
    assert stats.prefetch_reads > 0 and 0 < stats.prefetch_used <= stats.prefetch_reads
    assert plain.bank.stats.prefetch_reads == 0
    cache = make_prompt_cache(ahead.model)
    mx.eval(ahead.model(mx.array(ids)[None], cache=cache))  # prompt chunk: no prediction
    for token in ids[-4:]:
        mid = replace(ahead.bank.stats)
        mx.eval(ahead.model(mx.array([[token]]), cache=cache))
        delta = ahead.bank.stats.since(mid)
        assert delta.requested == len(ahead.manifest.expert_layers) * ahead.experts_per_token
        assert delta.reads == delta.misses + delta.prefetch_reads  # every record read is counted once
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


@pytest.mark.parametrize("piece", [None, 1000])
def test_staged_copies_give_the_same_results(models, monkeypatch, piece):
    """CUDA's path (reads land in pinned staging, each record is copied into its bank slot) gives what
    reading straight into the bank gives, with prefetch, bank hits and prompt chunks; every record read
    is copied whole into its slot exactly once, also when it is read in pieces of 1000 bytes."""
    from llm_flash_moe.bank import bank_pool, expert_bank

    if piece:
        monkeypatch.setattr(bank_pool, "READ_PIECE_BYTES", piece)

    prepared = models.prepared(models.hf("float32"))
    direct = load_flash_model(prepared)
    copies = HostCopies()
    monkeypatch.setattr(expert_bank, "device_copies", lambda: copies)
    staged = small_bank(load_flash_model(prepared), 12)  # evictions and prefetches happen
    assert not staged.bank.drop_page_cache  # the bank is not in the page cache's memory
    ids = direct.tokenizer.encode(PROMPT)
    assert mx.array_equal(staged.model(mx.array(ids)[None]), direct.model(mx.array(ids)[None]))
    assert greedy_tokens(staged.model, staged.tokenizer, ids) == greedy_tokens(direct.model, direct.tokenizer, ids)
    stats = staged.bank.stats
    assert stats.hits > 0 and stats.prefetch_reads > 0
    record = staged.manifest.expert_layers[0].layout
    assert sum(copies.copied) == stats.reads * record.parts_bytes
    assert 1 <= len(copies.pinned) <= 8  # one staging piece per read thread
    staged.close()
    assert not copies.pinned


def test_a_bank_holding_whole_layers_serves_them_without_host_synchronization(models):
    """Once every expert of a layer is in the bank the layer picks its slots on the device: a filled bank
    decodes with no host synchronization and no read, and still gives mlx-lm's tokens exactly."""
    hf = models.hf("bfloat16")
    reference, tokenizer = mlx_lm.load(str(models.reference(hf)))
    flash = load_flash_model(models.prepared(hf), compute="model")
    flash.bank.fill()
    assert all(flash.bank.complete(layer) for layer in flash.bank.layers)
    ids = tokenizer.encode(PROMPT)
    before = replace(flash.bank.stats)
    assert greedy_tokens(flash.model, flash.tokenizer, ids) == greedy_tokens(reference, tokenizer, ids)
    during = flash.bank.stats.since(before)
    assert during.router_launch_seconds == during.router_wait_seconds == 0  # no decode step synchronized
    assert during.reads == 0 and during.hits == during.requested > 0


def test_layers_completing_and_losing_experts_keep_mlx_lm_results(models):
    """A bank of 20 of the 32 experts: layers become complete (device-side slots) and then lose experts to
    other layers' misses, with prefetch on (and LRU, under which this tiny model's layers do complete);
    tokens and logits stay mlx-lm's."""
    hf = models.hf("bfloat16")
    reference, tokenizer = mlx_lm.load(str(models.reference(hf)))
    flash = small_bank(load_flash_model(models.prepared(hf), compute="model", prefetch=True, policy="lru"), 20)
    completed = []
    original = flash.bank.device_table

    def spy(layer):
        table = original(layer)
        if table is not None:
            completed.append(layer)
        return table

    flash.bank.device_table = spy
    for prompt in (PROMPT, "A different prompt about something else entirely, to route elsewhere."):
        ids = tokenizer.encode(prompt)
        assert greedy_tokens(flash.model, flash.tokenizer, ids, n=16) == greedy_tokens(reference, tokenizer, ids, n=16)
        assert mx.array_equal(flash.model(mx.array(ids)[None]), reference(mx.array(ids)[None]))
    assert completed and flash.bank.stats.misses > 20


def test_reads_a_layer_waits_for_go_before_reads_ahead():
    """With every read thread busy, a miss submitted after a prediction's reads is read before them."""
    import threading

    from llm_flash_moe.bank.bank_pool import Readers

    readers, gate, order = Readers(1), threading.Event(), []
    blocker = readers.submit(Readers.URGENT, gate.wait)
    ahead = [readers.submit(Readers.AHEAD, order.append, f"ahead {i}") for i in range(3)]
    urgent = [readers.submit(Readers.URGENT, order.append, f"miss {i}") for i in range(2)]
    failed = readers.submit(Readers.URGENT, lambda: 1 / 0)
    gate.set()
    for future in [blocker, *ahead, *urgent]:
        future.result(timeout=10)
    assert order == ["miss 0", "miss 1", "ahead 0", "ahead 1", "ahead 2"]
    assert isinstance(failed.exception(timeout=10), ZeroDivisionError)
    readers.shutdown()
    assert not any(t.is_alive() for t in readers._threads)
