"""`llm flash-moe bench`: the engine against its physical floors and against mlx-lm, on the 397B's shapes.

For each (bits, experts per token) it decodes the same teacher-forced tokens through a synthetic model
(``synthetic/flash_model.py``) and measures, in one run:

- ``io_floor_ms``: plain parallel ``pread``s of exactly the records the run needed, cold and warm;
- ``compute_floor_ms``: the same tokens with every needed expert already in memory (mlx-lm's SwitchGLU
  over the union of the experts the run touched, no reads, no host synchronization);
- ``sync_floor_ms``: the same, with one host synchronization per layer (the router's choice brought to
  the host and back), which any engine reading router-chosen experts needs;
- ``decode_ms_per_token``: the engine, cold (layer files evicted from the page cache) and warm, and where
  a warm token's host time goes (``warm_time_split_ms_per_token``);
- ``mlx_lm_ms_per_token``: mlx-lm's MoE with all experts resident, where they fit in half the RAM;
- prefill of a prompt: bytes read against the union of the experts it needs;
- routing statistics of the run, next to those published for the real model;
- peak memory, and per-token time, floor ratios and resident memory projected to the real model's 60
  layers (the first MoE layer, which nothing predicts, counted once: ``project_decode_ms``).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .expert_store import DEFAULT_READ_THREADS

REAL_LAYERS, REAL_FULL_ATTENTION_LAYERS = 60, 15
PUBLISHED_ROUTING = {"reuse_consecutive": [0.08, 0.34], "touched_over_30_tokens": [0.43, 0.57],
                     "lru_hit_rate_16_to_128": [0.49, 0.71]}
DECODE_START = 1024  # teacher-forced decode tokens start here; the prefill prompt uses 0..prompt_tokens-1


@dataclass
class BenchOptions:
    layers: int = 4
    bits: Tuple[int, ...] = (2, 4)
    experts: Tuple[int, ...] = (4, 10)
    tokens: int = 16
    repeats: int = 3  # each timed decode is the median of this many passes
    prompt_tokens: int = 512
    directory: Optional[Path] = None
    read_threads: int = DEFAULT_READ_THREADS
    cache_gb: float = 0.0
    levers: bool = False  # also measure the engine's settings one at a time (see ``levers``)


LEVER_READ_THREADS = 16  # against the default (expert_store.DEFAULT_READ_THREADS)
LEVER_CACHE_EXPERTS = 64  # per layer: an LRU of this size hits 49-71 % of the time on the real model


# ------------------------------------------------------------------------------ measuring helpers


class Trace:
    """Records every (layer, experts) the store is asked for, and how long each request took."""

    def __init__(self, store):
        self.calls: List[Tuple[int, Tuple[int, ...]]] = []
        self.seconds: List[float] = []
        self._load = store.load
        store.load = self._record

    def _record(self, layer, experts):
        self.calls.append((layer, tuple(int(e) for e in experts)))
        start = time.perf_counter()
        try:
            return self._load(layer, experts)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def first_layer_extra_ms(self, tokens: int) -> float:
        """How much longer per token the first MoE layer waited for its records than the mean of the others:
        nothing predicts a token's first layer (prefetch runs from one layer to the next), so it always reads
        on demand. It weighs 1 in 4 layers here and 1 in 60 in the real model."""
        first = min(layer for layer, _ in self.calls)
        waits: Dict[int, float] = {}
        for (layer, _), seconds in zip(self.calls, self.seconds):
            waits[layer] = waits.get(layer, 0.0) + seconds
        others = [w for layer, w in waits.items() if layer != first]
        return (waits[first] - (np.mean(others) if others else 0.0)) * 1000 / tokens


def calls_by_layer(calls) -> Dict[int, List[set]]:
    """``(layer, experts)`` calls grouped by layer, in order."""
    out: Dict[int, List[set]] = {}
    for layer, experts in calls:
        out.setdefault(layer, []).append(set(experts))
    return out


def routing_stats(per_layer: Dict[int, List[set]]) -> dict:
    def lru_hit_rate(sequence, size):
        cache, hits, total = OrderedDict(), 0, 0
        for chosen in sequence:
            for e in chosen:
                total += 1
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                else:
                    cache[e] = True
                    if len(cache) > size:
                        cache.popitem(last=False)
        return hits / total if total else 0.0

    reuse, touched, lru = [], [], {n: [] for n in (16, 32, 64, 128)}
    for sequence in per_layer.values():
        k = len(sequence[0])
        reuse += [len(a & b) / k for a, b in zip(sequence, sequence[1:])]
        touched.append(len(set().union(*sequence[:30])) / 512)
        for n in lru:
            lru[n].append(lru_hit_rate(sequence, n))
    return {"reuse_consecutive": round(float(np.mean(reuse)), 3),
            "touched_over_30_tokens": round(float(np.mean(touched)), 3),
            "lru_hit_rate": {str(n): round(float(np.mean(v)), 3) for n, v in lru.items()},
            "published_for_the_real_model": PUBLISHED_ROUTING}


def evict(paths) -> bool:
    """Drop files from the OS page cache; False where the OS offers no way (then 'cold' is not measured)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def io_floor_ms(model_dir: Path, manifest, calls, tokens: int, threads: int, direct: bool = False) -> float:
    """Plain parallel preads of exactly the records in ``calls``, per token (``direct``: with O_DIRECT,
    bypassing the page cache, into page-aligned buffers; records are 16 KiB multiples)."""
    import mmap

    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {layer.layer: os.open(model_dir / layer.file, flags) for layer in manifest.expert_layers}
    size = manifest.expert_layers[0].layout.record_size
    buffers = [mmap.mmap(-1, size) for _ in range(max(len(e) for _, e in calls))]
    try:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            for layer, experts in calls:
                list(pool.map(lambda i: os.preadv(fds[layer], [buffers[i]], experts[i] * size),
                              range(len(experts))))
            return (time.perf_counter() - start) * 1000 / tokens
    finally:
        for fd in fds.values():
            os.close(fd)


class ResidentExperts:
    """mlx-lm's SwitchGLU over experts held in memory: the compute floor and the fully resident baseline.

    With ``synchronize`` each call first brings the router's choice to the host and back, as any engine
    that reads the chosen experts must: the floor of an engine with one host synchronization per layer.
    """

    def __init__(self, model_dir: Path, entry, experts: List[int], dtype, synchronize: bool = False):
        import mlx.core as mx

        from .flash_layout import split_record

        self.synchronize = synchronize
        experts = sorted(experts)
        remap = np.zeros(entry.num_experts, dtype=np.uint32)
        remap[experts] = np.arange(len(experts), dtype=np.uint32)
        self.remap, self.quant = mx.array(remap), entry.quantization
        self.parts, raw = {}, {}
        for part in entry.layout.parts:  # filled in place: peak memory is the experts themselves
            buf = mx.zeros((len(experts), part.nbytes), dtype=mx.uint8)
            self.parts[part.name] = buf.view(getattr(mx, part.dtype)).reshape(len(experts), *part.shape)
            mx.eval(buf, self.parts[part.name])
            raw[part.name] = np.array(buf, copy=False)
        size = entry.layout.record_size
        fd = os.open(model_dir / entry.file, os.O_RDONLY)
        try:
            for row, e in enumerate(experts):
                record = np.frombuffer(os.pread(fd, size, e * size), dtype=np.uint8)
                for name, view in split_record(record, entry.layout).items():
                    raw[name][row] = view.reshape(-1).view(np.uint8)
        finally:
            os.close(fd)
        # scales and biases in the activations' dtype once, as a model loaded in that dtype holds them
        self.parts = {k: v if k.endswith(".weight") else v.astype(dtype) for k, v in self.parts.items()}
        mx.eval(self.parts)

    def __call__(self, x, indices):
        import mlx.core as mx

        from . import kernels

        if self.synchronize:
            indices = mx.array(np.array(indices))
        return kernels.LoadedSwitchGLU(self.parts, self.quant)(x, mx.take(self.remap, indices))


def decode_ms(flash, tokens: List[int], repeats: int = 1, cold_files=None) -> float:
    """Teacher-forced decode of ``tokens`` from an empty cache; ms per token, the median of ``repeats``
    passes (each after evicting ``cold_files`` from the page cache, when given)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    times = []
    for _ in range(repeats):
        if cold_files:
            evict(cold_files)
        cache = make_prompt_cache(flash.model)
        mx.eval(flash.model(mx.array([[tokens[0]]]), cache=cache))  # first token: allocations, not timed
        start = time.perf_counter()
        for t in tokens[1:]:
            mx.eval(flash.model(mx.array([[t]]), cache=cache))
        times.append((time.perf_counter() - start) * 1000 / (len(tokens) - 1))
    return float(np.median(times))


def decode_logits(flash, tokens: List[int]) -> np.ndarray:
    """The logits of a teacher-forced decode of ``tokens`` (float32, one row per token)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(flash.model)
    rows = [np.array(flash.model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)) for t in tokens]
    return np.stack(rows)


def agreement(engine: np.ndarray, reference: np.ndarray) -> dict:
    """How closely the engine's logits follow the reference's, token by token."""
    return {"max_abs_diff_vs_max_abs": float(np.abs(engine - reference).max() / np.abs(reference).max()),
            "top1_agreement": float(np.mean(engine.argmax(axis=1) == reference.argmax(axis=1)))}


def with_resident_experts(flash, experts_by_layer: Dict[int, List[int]], synchronize: bool = False):
    """Swap every block's streaming experts for in-memory ones (``ResidentExperts``); returns a function
    that swaps them back."""
    from .mlx_model import moe_blocks

    saved = {}
    dtype = flash.model.layers[0].mlp.gate.scales.dtype  # the activations' dtype
    for index, block in moe_blocks(flash.model):
        saved[index] = block.switch_mlp
        block.switch_mlp = ResidentExperts(flash.directory, flash.manifest.layer(index), experts_by_layer[index],
                                           dtype, synchronize)

    def restore():
        for index, block in moe_blocks(flash.model):
            block.switch_mlp = saved[index]

    return restore


def head_ms(flash) -> float:
    """Time of what is outside the decoder layers for one token (embedding, final norm, lm_head)."""
    import mlx.core as mx

    inner = flash.model.language_model
    x = inner.model.embed_tokens(mx.array([[1]]))
    mx.eval(inner.lm_head(inner.model.norm(x)))
    start = time.perf_counter()
    for t in range(5):
        x = inner.model.embed_tokens(mx.array([[t]]))
        mx.eval(inner.lm_head(inner.model.norm(x)))
    return (time.perf_counter() - start) * 1000 / 5


def resident_projection(flash, record_size: int) -> dict:
    """Resident bytes of this process's model, and projected to the real model's 60 layers."""
    from mlx.utils import tree_flatten

    def nbytes(module):
        return sum(v.nbytes for _, v in tree_flatten(module.parameters()))

    layers = flash.model.layers
    linear = [nbytes(l) for l in layers if l.is_linear]
    full = [nbytes(l) for l in layers if not l.is_linear]
    outside = nbytes(flash.model) - sum(linear) - sum(full)
    buffers = flash.store.slots * record_size
    deltanet_state = (REAL_LAYERS - REAL_FULL_ATTENTION_LAYERS) * 4 * 2 ** 20
    projected = (outside + (REAL_LAYERS - REAL_FULL_ATTENTION_LAYERS) * np.mean(linear)
                 + REAL_FULL_ATTENTION_LAYERS * np.mean(full) + buffers + deltanet_state)
    return {"model_bytes": nbytes(flash.model), "expert_buffer_bytes": buffers,
            "projected_60_layers_gb": round(float(projected) / 1e9, 2)}


def peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 2)


def machine() -> dict:
    import mlx.core as mx

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "memory_gb": round(memory / 1e9, 1) if memory else None, "mlx_device": str(mx.default_device()),
            "mlx": mx.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------ one configuration


def bench_one(model_dir: Path, k: int, opts: BenchOptions, log) -> dict:
    import mlx.core as mx

    from .engine import load_flash_model

    flash = load_flash_model(model_dir, experts_per_token=k, cache_bytes=int(opts.cache_gb * 1e9),
                             read_threads=opts.read_threads)
    manifest, store = flash.manifest, flash.store
    record_size = manifest.expert_layers[0].layout.record_size
    files = [model_dir / layer.file for layer in manifest.expert_layers]
    tokens = list(range(DECODE_START, DECODE_START + opts.tokens + 1))
    result = {"bits": manifest.expert_layers[0].quantization.bits, "experts_per_token": k,
              "record_bytes": record_size, "decode_tokens": opts.tokens}

    trace = Trace(store)
    flash.set_prefetch(False)
    cold = evict(files)
    cold_files = files if cold else None
    before = store.stats.bytes_read
    plain_cold = decode_ms(flash, tokens, opts.repeats, cold_files)
    one_pass = trace.calls[:len(trace.calls) // opts.repeats]  # every pass asks for the same records
    decode_calls = one_pass[len(manifest.expert_layers):]  # the timed tokens only
    exact_bytes = (store.stats.bytes_read - before) / (opts.repeats * len(tokens))
    distinct = sum(len(e) for _, e in one_pass) / len(tokens)
    result["routing"] = routing_stats(calls_by_layer(one_pass))
    plain_warm = decode_ms(flash, tokens, opts.repeats)
    store.load = trace._load  # stop tracing
    log(f"  {result['bits']}-bit k={k}: engine without prefetch cold {plain_cold:.1f} warm {plain_warm:.1f} ms/token")

    flash.set_prefetch(True)
    before = replace(store.stats)
    timed = Trace(store)
    decode_cold = decode_ms(flash, tokens, opts.repeats, cold_files)
    store.load = timed._load
    first_layer_extra = {"cold": timed.first_layer_extra_ms(opts.repeats * len(tokens)) if cold else None}
    prefetch = store.stats.since(before)
    before = replace(store.stats)
    timed = Trace(store)
    decode_warm = decode_ms(flash, tokens, opts.repeats)
    store.load = timed._load
    first_layer_extra["warm"] = timed.first_layer_extra_ms(opts.repeats * len(tokens))
    warm_split = warm_time_split(decode_warm, store.stats.since(before), opts.repeats * len(tokens))
    log(f"  {result['bits']}-bit k={k}: engine with prefetch cold {decode_cold:.1f} warm {decode_warm:.1f} ms/token, "
        f"prediction hit rate {prefetch.prefetch_hit_rate:.2f}")
    bytes_per_token = prefetch.bytes_read / (opts.repeats * len(tokens))

    io_cold = io_floor_ms(model_dir, manifest, decode_calls, opts.tokens, opts.read_threads) if evict(files) else None
    io_warm = io_floor_ms(model_dir, manifest, decode_calls, opts.tokens, opts.read_threads)
    log(f"  {result['bits']}-bit k={k}: io floor cold {io_cold} warm {io_warm:.1f} ms/token")

    union = {}
    for layer, experts in trace.calls:
        union.setdefault(layer, set()).update(experts)
    union = {l: sorted(e) for l, e in union.items()}
    restore = with_resident_experts(flash, union)
    compute = decode_ms(flash, tokens, opts.repeats)
    reference_logits = decode_logits(flash, tokens)  # mlx-lm's SwitchGLU on the same experts
    restore()
    restore = with_resident_experts(flash, union, synchronize=True)
    sync_floor = decode_ms(flash, tokens, opts.repeats)
    restore()
    log(f"  {result['bits']}-bit k={k}: compute floor {compute:.1f}, with a host sync per layer {sync_floor:.1f} ms/token")

    result["agreement_with_mlx_lm"] = agreement(decode_logits(flash, tokens), reference_logits)
    log(f"  {result['bits']}-bit k={k}: logits vs mlx-lm's SwitchGLU {result['agreement_with_mlx_lm']}")

    mlx_lm = None
    memory = machine()["memory_gb"]
    if memory and manifest.expert_bytes < memory * 1e9 / 2:
        restore = with_resident_experts(flash, {l.layer: list(range(l.num_experts)) for l in manifest.expert_layers})
        mlx_lm = decode_ms(flash, tokens, opts.repeats)
        restore()
        mx.clear_cache()
        log(f"  {result['bits']}-bit k={k}: mlx-lm fully resident {mlx_lm:.1f} ms/token")

    result.update({
        "io_floor_ms": {"cold": _r(io_cold), "warm": _r(io_warm)},
        "compute_floor_ms": _r(compute),
        "sync_floor_ms": _r(sync_floor),
        "decode_ms_per_token": {"cold": _r(decode_cold) if cold else None, "warm": _r(decode_warm)},
        "decode_without_prefetch_ms": {"cold": _r(plain_cold) if cold else None, "warm": _r(plain_warm)},
        "prefetch_hit_rate": round(prefetch.prefetch_hit_rate, 3),
        "warm_time_split_ms_per_token": warm_split,
        "bytes_read_per_token": int(bytes_per_token),
        "bytes_read_per_token_without_prefetch": int(exact_bytes),
        "expected_bytes_per_token": int(distinct * record_size),
        "hit_rate": round(store.stats.hit_rate, 3),
        "mlx_lm_ms_per_token": _r(mlx_lm),
        "mlx_lm_note": None if mlx_lm else "all experts do not fit in half the RAM",
    })
    result["ratio_vs_floor_sum"] = {m: _ratio(result["decode_ms_per_token"][m], result["io_floor_ms"][m], compute, sum)
                                    for m in ("cold", "warm")}
    result["ratio_vs_floor_max"] = {m: _ratio(result["decode_ms_per_token"][m], result["io_floor_ms"][m], compute, max)
                                    for m in ("cold", "warm")}
    result["warm_vs_mlx_lm_speed"] = round(mlx_lm / decode_warm, 3) if mlx_lm else None

    if opts.prompt_tokens:
        trace = Trace(store)
        from mlx_lm.models.cache import make_prompt_cache

        before = store.stats.bytes_read
        start = time.perf_counter()
        mx.eval(flash.model(mx.array([list(range(opts.prompt_tokens))]), cache=make_prompt_cache(flash.model)))
        elapsed = time.perf_counter() - start
        store.load = trace._load
        union_records = sum(len(set().union(*[set(e) for l2, e in trace.calls if l2 == l]))
                            for l in {l for l, _ in trace.calls})
        result["prefill"] = {"tokens": opts.prompt_tokens, "ms": _r(elapsed * 1000),
                             "bytes_read": store.stats.bytes_read - before,
                             "union_bytes": union_records * record_size}
        log(f"  {result['bits']}-bit k={k}: prefill {opts.prompt_tokens} tokens {elapsed:.1f} s")

    if opts.levers:
        try:
            direct = io_floor_ms(model_dir, manifest, decode_calls, opts.tokens, opts.read_threads, direct=True)
        except (OSError, AttributeError):  # a file system without O_DIRECT (tmpfs), or an OS without it
            direct = None
        result["levers"] = {"io_floor_o_direct_ms": _r(direct), **engine_levers(model_dir, manifest, k, tokens, cold_files, opts)}
        log(f"  {result['bits']}-bit k={k}: levers {result['levers']}")

    head = head_ms(flash)
    projected = {m: None if v is None else project_decode_ms(v, head, first_layer_extra[m], opts.layers)
                 for m, v in result["decode_ms_per_token"].items()}
    result["projected_60_layers"] = {
        "head_ms": _r(head),
        "first_layer_extra_read_wait_ms": {m: _r(v) for m, v in first_layer_extra.items()},
        "decode_ms_per_token": {m: _r(v) for m, v in projected.items()},
        "tokens_per_second": {m: None if v is None else round(1000 / v, 3) for m, v in projected.items()},
        **resident_projection(flash, record_size),
    }
    # the floors scale with the layers too: reads per layer, compute per layer plus the head once
    io_projected = {m: None if v is None else REAL_LAYERS * v / opts.layers for m, v in result["io_floor_ms"].items()}
    compute_projected = head + REAL_LAYERS * (compute - head) / opts.layers
    for name, combine in (("ratio_vs_floor_sum", sum), ("ratio_vs_floor_max", max)):
        result["projected_60_layers"][name] = {m: _ratio(projected[m], io_projected[m], compute_projected, combine)
                                               for m in ("cold", "warm")}
    result["peak_rss_gb"] = peak_rss_gb()
    result["peak_mlx_gb"] = round(mx.get_peak_memory() / 1e9, 2)
    flash.close()
    return result


def engine_levers(model_dir: Path, manifest, k: int, tokens: List[int], cold_files, opts: BenchOptions) -> dict:
    """The engine (with prefetch) cold (when ``cold_files`` can be evicted) and warm under other settings,
    one at a time."""
    from .engine import load_flash_model

    record = max(layer.layout.parts_bytes for layer in manifest.expert_layers)
    variants = {f"read_threads_{LEVER_READ_THREADS}": {"read_threads": LEVER_READ_THREADS}}
    variants[f"record_cache_{LEVER_CACHE_EXPERTS}_per_layer"] = {
        "cache_bytes": LEVER_CACHE_EXPERTS * len(manifest.expert_layers) * record, "read_threads": opts.read_threads}
    out = {}
    for name, settings in variants.items():
        flash = load_flash_model(model_dir, experts_per_token=k, **settings)
        try:
            cold = decode_ms(flash, tokens, opts.repeats, cold_files) if cold_files else None
            before = replace(flash.store.stats)
            warm = decode_ms(flash, tokens, opts.repeats)
            during = flash.store.stats.since(before)
            out[name] = {"cold": _r(cold), "warm": _r(warm), "warm_cache_hit_rate": round(during.hit_rate, 3),
                         "warm_time_split_ms_per_token": warm_time_split(warm, during, opts.repeats * len(tokens))}
        finally:
            flash.close()
    return out


def warm_time_split(decode_ms_per_token: float, stats, tokens: int) -> dict:
    """Where a warm token's time goes on the host (``stats``: the store's counters over ``tokens`` decoded
    tokens): waiting for records, launching the GPU work up to each router, waiting for the router's
    choice, and the rest (Python building the graph, the kernels' calls, the final evaluation)."""
    split = {"read_wait": stats.read_seconds, "router_launch": stats.router_launch_seconds,
             "router_wait": stats.router_wait_seconds}
    split = {name: seconds * 1000 / tokens for name, seconds in split.items()}
    split["other"] = decode_ms_per_token - sum(split.values())
    return {name: _r(v) for name, v in split.items()}


def project_decode_ms(decode: float, head: float, first_layer_extra: float, layers: int) -> float:
    """A token's time in the real model's 60 layers from this model's ``layers``: the time outside the
    layers (``head``), the first MoE layer's extra wait for its unpredicted records once, and 60 typical
    layers (the others' mean)."""
    typical = (decode - head - first_layer_extra) / layers
    return head + first_layer_extra + REAL_LAYERS * typical


def _r(v):
    return None if v is None else round(float(v), 2)


def _ratio(decode, io, compute, combine):
    if decode is None or io is None:
        return None
    return round(decode / combine([io, compute]), 3)


def run(opts: BenchOptions, log=print) -> dict:
    from .registry import root
    from .synthetic.flash_model import write_synthetic_model

    directory = Path(opts.directory or root() / "bench")
    results = []
    for bits in opts.bits:
        model_dir = directory / f"qwen397-shape-{opts.layers}l-{bits}bit"
        log(f"synthetic model {model_dir} (built once, reused)")
        write_synthetic_model(model_dir, layers=opts.layers, bits=bits)
        for k in opts.experts:
            results.append(bench_one(model_dir, k, opts, log))
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "layers": opts.layers, "results": results}
