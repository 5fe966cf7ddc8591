"""`llm flash-moe bench`: the engine at full depth against its floors and mlx-lm, on the 397B's shapes.

A synthetic model (``synthetic/flash_model.py``) with Qwen3.5-397B-A17B's exact per-layer shapes, any
number of layers (``--layers 60`` is the real depth) and of experts per layer (fewer than 512 so that
the files fit a normal disk), decodes the same teacher-forced tokens through mlx-lm's model for each
(bits, experts per token). One run measures, all in ms per decoded token unless said otherwise:

- ``resident_ms_per_token``: mlx-lm with every expert in memory (its SwitchGLU over all of a layer's
  experts, no reads, no host synchronization), where they fit in half the memory;
- ``sync_floor_ms_per_token``: the same with one host synchronization per MoE layer (the router's
  choice brought to the host and back), which any engine that reads router-chosen experts needs;
- ``warm_io_floor_ms_per_token``: plain parallel ``pread``s, from the page cache, of every record the
  tokens route to (what an engine without a bank pays on every token);
- ``cold_disk_gbps``: the disk's cold read bandwidth for records, with the engine's read threads;
- per bank size (``--bank-fraction``: a share of all the experts), the engine through the same loop:
  ``ms_per_token`` (median of the passes after the first; the bank carries over between passes),
  ``first_pass_ms_per_token`` (from an empty bank, files evicted), ``bytes_read_per_token``,
  ``bank_hit_rate``, ``lru_hit_rate_same_capacity`` and the bytes that LRU would read (simulated on
  the requests the engine made, the same capacity, global and per layer), prefetch figures,
  ``peak_rss_gb``; with ``--memory-limit`` the partial banks decode in a child process under a cgroup v2
  ``memory.max`` (page cache charged), each read dropped from the page cache as on unified memory, and
  the cgroup's peak memory is reported;
- ``target_ms_per_token``: 1.10 x the sync floor for a bank that holds every expert, and 1.10 x (sync
  floor + missed bytes per token / cold disk bandwidth) for a partial one;
- prefill: bytes read against the union of the experts a prompt chunk needs;
- the routing statistics of the run, and ``routing_calibration``: the same statistics at the real
  model's 512 experts per layer, measured on a routing-only model (``routing_only``), next to the
  ranges published for the real model;
- graph primitives per MoE block for one decoded token (mlx-lm's block, the engine's block): a proxy for
  kernel launches per layer.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..bank.bank_pool import DEFAULT_READ_THREADS, Pool, drop_from_page_cache, pieces
from .cache_replay import horizon_misses, lru_misses, min_misses
from ..errors import FlashMoeError

PUBLISHED_ROUTING = {"reuse_consecutive": [0.08, 0.34], "touched_over_30_tokens": [0.43, 0.57],
                     "lru_hit_rate_16_to_128": [0.49, 0.71], "next_layer_prediction_recall": [0.53, 0.88],
                     "gini": {"range": [0.20, 0.52], "mean": 0.38}, "top20_share": {"range": [0.30, 0.54], "mean": 0.42}}
DECODE_START = 1024  # teacher-forced decode tokens are drawn from here on, each once (``Tokens``)
TARGET_RATIO = 1.10
WALK_TOKENS = 4096  # the synthetic model's embeddings walk over this many ids (flash_model.write_synthetic_model)
CALIBRATION_EXPERTS, CALIBRATION_TOKENS = 512, 128


@dataclass
class BenchOptions:
    layers: int = 4
    experts_per_layer: int = 512
    bits: Tuple[int, ...] = (4,)
    experts: Tuple[int, ...] = (4, 10)
    tokens: int = 64  # timed decoded tokens of a measurement, each new (never a pass repeated)
    warmup_tokens: int = 48  # decoded before the timed ones in the same stream (the bank fills)
    repeats: int = 3  # timed streams for the floors (each of new tokens); figures are medians
    prompt_tokens: Tuple[int, ...] = (64,)
    bank_fractions: Tuple[float, ...] = (1.0, 0.14, 0.25)  # a 48 / 64 GB Mac's share of the 397B at 4 bits
    prefetch: Tuple[bool, ...] = (True, False)  # banks with and without reading ahead
    decode: bool = True  # False: only the prefill of ``prompt_tokens``
    memory_limit_gb: Optional[float] = None
    calibration_layers: int = 8  # 0 skips the routing calibration
    directory: Optional[Path] = None
    read_threads: int = DEFAULT_READ_THREADS


# ------------------------------------------------------------------------------ decoding and timing


class Tokens:
    """Teacher-forced decode tokens, each handed out once: consecutive ids from ``DECODE_START`` (the
    synthetic model's embeddings walk slowly along ids, so consecutive tokens route alike, as a text's do),
    never a pass over tokens already decoded (a loop over the same tokens flatters any frequency policy)."""

    def __init__(self, start: int = DECODE_START):
        self.next = start

    def take(self, n: int) -> List[int]:
        if self.next + n > WALK_TOKENS:
            raise FlashMoeError(f"the bench needs more than the {WALK_TOKENS - DECODE_START:,} new tokens the "
                                "synthetic model's routing is shaped for: use fewer --tokens / --warmup-tokens / "
                                "--repeats / --bank-fraction")
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def decode_ms(model, tokens: List[int], before_pass=None) -> float:
    """One teacher-forced decode of ``tokens`` from an empty cache; ms per token after the first."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    if before_pass is not None:
        before_pass()
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[tokens[0]]]), cache=cache))  # first token: allocations, not timed
    start = time.perf_counter()
    for t in tokens[1:]:
        mx.eval(model(mx.array([[t]]), cache=cache))
    return (time.perf_counter() - start) * 1000 / (len(tokens) - 1)


def median_ms(model, supply: Tokens, tokens: int, repeats: int) -> float:
    """Median ms/token of ``repeats`` decodes, each of ``tokens`` + 1 new tokens."""
    return float(np.median([decode_ms(model, supply.take(tokens + 1)) for _ in range(repeats)]))


def decode_stream(model, warmup: List[int], timed: List[int], at_timed=None) -> float:
    """One teacher-forced stream: ``warmup`` then ``timed`` tokens in one cache (as a conversation goes on);
    ``at_timed()`` is called between them; returns ms per timed token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for t in warmup:
        mx.eval(model(mx.array([[t]]), cache=cache))
    if at_timed is not None:
        at_timed()
    start = time.perf_counter()
    for t in timed:
        mx.eval(model(mx.array([[t]]), cache=cache))
    return (time.perf_counter() - start) * 1000 / len(timed)


def decode_logits(model, tokens: List[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    return np.stack([np.array(model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)) for t in tokens])


def agreement(engine: np.ndarray, reference: np.ndarray) -> dict:
    """How closely the engine's logits follow the reference's, token by token."""
    return {"max_abs_diff_vs_max_abs": float(np.abs(engine - reference).max() / np.abs(reference).max()),
            "top1_agreement": float(np.mean(engine.argmax(axis=1) == reference.argmax(axis=1)))}


class Requests:
    """Every (layer, experts) the bank is asked for, in order (the bank's ``trace`` callback)."""

    def __init__(self, bank):
        self.calls: List[Tuple[int, Tuple[int, ...]]] = []
        bank.trace = lambda layer, experts: self.calls.append((layer, tuple(int(e) for e in experts)))


# ------------------------------------------------------------------------------ routing statistics


def by_layer(calls) -> Dict[int, List[set]]:
    out: Dict[int, List[set]] = {}
    for layer, experts in calls:
        out.setdefault(layer, []).append(set(experts))
    return out


def popularity(sequence: List[set], experts_per_layer: int) -> Tuple[float, float]:
    """A layer's expert popularity over ``sequence`` (its choices, token by token): the Gini coefficient of
    the experts' choice counts, and the share of choices taken by the most chosen 20 % of its experts."""
    counts = np.zeros(experts_per_layer)
    for chosen in sequence:
        counts[list(chosen)] += 1
    ordered = np.sort(counts)
    n = len(ordered)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ ordered / (n * ordered.sum()))
    top = float(ordered[-max(1, n // 5):].sum() / ordered.sum())
    return gini, top


def routing_stats(per_layer: Dict[int, List[set]], experts_per_layer: int, recall: Optional[float] = None) -> dict:
    """Reuse between consecutive tokens, share of a layer's experts touched over 30 tokens, per-layer LRU
    hit rates for 16-128 entries, per-layer popularity (Gini, top 20 %'s share), and the next-layer
    prediction recall when given."""
    reuse, touched, lru = [], [], {n: [] for n in (16, 32, 64, 128)}
    ginis, tops = [], []
    for sequence in per_layer.values():
        k = len(sequence[0])
        reuse += [len(a & b) / k for a, b in zip(sequence, sequence[1:])]
        touched.append(len(set().union(*sequence[:30])) / experts_per_layer)
        total = sum(len(s) for s in sequence)
        for n in lru:
            lru[n].append(1 - lru_misses([(0, tuple(s)) for s in sequence], n) / total)
        gini, top = popularity(sequence, experts_per_layer)
        ginis.append(gini)
        tops.append(top)
    out = {"tokens": len(next(iter(per_layer.values()))), "experts_per_layer": experts_per_layer,
           "reuse_consecutive": _r3(np.mean(reuse)), "touched_over_30_tokens": _r3(np.mean(touched)),
           "lru_hit_rate": {str(n): _r3(np.mean(v)) for n, v in lru.items()},
           "gini": {"mean": _r3(np.mean(ginis)), "min": _r3(min(ginis)), "max": _r3(max(ginis)),
                    "per_layer": [_r3(g) for g in ginis]},
           "top20_share": {"mean": _r3(np.mean(tops)), "min": _r3(min(tops)), "max": _r3(max(tops))}}
    if recall is not None:
        out["next_layer_prediction_recall"] = _r3(recall)
    return out


def routing_only(model_dir: Path, k: int, tokens: List[int]) -> dict:
    """The routing statistics of a synthetic model without reading any expert: each MoE block routes
    (and predicts the next layer's choice with the next router, as prefetch does) and adds only its
    shared expert."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from ..engine.loader import load_resident_model
    from ..engine.mlx_model import cast_floats, moe_blocks
    from ..engine.streaming_moe import route

    model, _ = load_resident_model(model_dir, lazy=True)
    if mx.default_device() == mx.cpu:
        cast_floats(model, mx.float32)
    blocks = [b for _, b in moe_blocks(model)]
    chosen: Dict[int, List[set]] = {}
    recalls = []

    class Probe:
        def __init__(self, index, block, following):
            self.index, self.block, self.following = index, block, following

        def __call__(self, x):
            block = self.block
            block.top_k = k
            inds = np.array(route(block, x)[0]).reshape(-1)
            chosen.setdefault(self.index, []).append(set(inds.tolist()))
            if self.index in predicted:
                recalls.append(len(predicted.pop(self.index) & chosen[self.index][-1]) / k)
            if self.following is not None:
                self.following[1].top_k = k
                guess = np.array(route(self.following[1], x)[0]).reshape(-1)
                predicted[self.following[0]] = set(guess.tolist())
            return mx.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)

    predicted: Dict[int, set] = {}
    pairs = moe_blocks(model)
    for (index, block), following in zip(pairs, pairs[1:] + [None]):
        model.layers[index].mlp = Probe(index, block, following)
    cache = make_prompt_cache(model)
    for t in tokens:
        mx.eval(model(mx.array([[t]]), cache=cache))
    return routing_stats(chosen, blocks[0].num_experts, float(np.mean(recalls)))


def routing_calibration(directory: Path, opts: BenchOptions, log) -> Optional[dict]:
    """The routing statistics at the real model's 512 experts per layer (routing-only model)."""
    from ..synthetic.flash_model import layer_ginis, write_synthetic_model

    if not opts.calibration_layers:
        return None
    model_dir = directory / f"qwen397-routing-{opts.calibration_layers}l"
    log(f"routing calibration model {model_dir} (resident weights only)")
    write_synthetic_model(model_dir, layers=opts.calibration_layers, bits=4, expert_files=False,
                          experts_per_layer=CALIBRATION_EXPERTS)
    tokens = list(range(DECODE_START, DECODE_START + CALIBRATION_TOKENS))
    out = {"layers": opts.calibration_layers, "published_for_the_real_model": PUBLISHED_ROUTING,
           "gini_published_at_these_depths": layer_ginis(opts.calibration_layers)}
    for k in sorted(set(opts.experts) | {10}):
        out[f"k{k}"] = routing_only(model_dir, k, tokens)
        log(f"  routing at 512 experts, k={k}: {out[f'k{k}']}")
    return out


# ------------------------------------------------------------------------------ floors


def read_records(model_dir: Path, manifest, calls, threads: int) -> float:
    """Seconds to pread every record of ``calls`` ((layer, experts) in order; each call's records in
    parallel, in the bank's pieces) into page-aligned buffers."""
    import mmap

    fds = {layer.layer: os.open(model_dir / layer.file, os.O_RDONLY) for layer in manifest.expert_layers}
    size = manifest.expert_layers[0].layout.record_size
    buffers = [mmap.mmap(-1, size) for _ in range(max(len(e) for _, e in calls))]
    ranges = pieces(size)

    def read(fd, i, offset, lo, hi):
        os.preadv(fd, [memoryview(buffers[i])[lo:hi]], offset + lo)

    try:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            for layer, experts in calls:
                list(pool.map(lambda job: read(fds[layer], *job),
                              [(i, e * size, lo, hi) for i, e in enumerate(experts) for lo, hi in ranges]))
            return time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)


def cold_disk_gbps(model_dir: Path, manifest, calls, threads: int) -> Optional[float]:
    """Cold read bandwidth of the layer files for the records of ``calls`` (each once), or None where
    the page cache cannot be emptied."""
    if not drop_from_page_cache([model_dir / l.file for l in manifest.expert_layers]):
        return None
    seen, distinct = set(), []
    for layer, experts in calls:
        fresh = tuple(e for e in experts if (layer, e) not in seen)
        seen.update((layer, e) for e in fresh)
        if fresh:
            distinct.append((layer, fresh))
    seconds = read_records(model_dir, manifest, distinct, threads)
    return len(seen) * manifest.expert_layers[0].layout.record_size / seconds / 1e9


class ResidentMoE:
    """mlx-lm's MoE arithmetic with every expert of the layer in memory (its SwitchGLU over them, indexed
    by expert id), reusing the streaming block's router and shared expert. With ``synchronize`` the
    router's choice goes to the host and back first: the sync floor."""

    def __init__(self, block, pool: Pool, synchronize: bool):
        self.block, self.pool, self.synchronize = block, pool, synchronize

    def __call__(self, x):
        import mlx.core as mx

        from .. import kernels
        from ..engine.streaming_moe import route

        block = self.block
        inds, scores = route(block, x)
        if self.synchronize:
            inds = mx.array(np.array(inds))
        return block._plus_shared(x, block._weighted(kernels.LoadedSwitchGLU(self.pool.arrays, block.quant)(x, inds),
                                                     scores))


def with_resident_experts(flash, synchronize: bool = False):
    """Swap every streaming block for ``ResidentMoE`` over all its experts (read from the layer files);
    returns a function that swaps them back. ``restore.blocks`` are the resident blocks (their
    ``synchronize`` can be switched without reading the experts again)."""
    from ..bank.bank_pool import device_copies
    from ..engine.mlx_model import moe_blocks

    copies, saved = device_copies(), {}
    for index, block in moe_blocks(flash.model):
        info = flash.manifest.layer(index)
        pool = Pool(info.layout, info.num_experts, copies)
        fd = os.open(flash.directory / info.file, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(DEFAULT_READ_THREADS) as threads:
                list(threads.map(lambda e: pool.read_record(fd, e * info.layout.record_size, e),
                                  range(info.num_experts)))
        finally:
            os.close(fd)
        saved[index] = block
        flash.model.layers[index].mlp = ResidentMoE(block, pool, synchronize)

    def restore():
        for index, block in saved.items():
            flash.model.layers[index].mlp.pool.close()
            flash.model.layers[index].mlp = block

    restore.blocks = [flash.model.layers[index].mlp for index in saved]
    return restore


VIEWS = {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Transpose", "AsStrided", "View", "Slice",
         "StopGradient", "Depends"}  # no kernel of their own (or none for one decoded token)


def count_primitives(*arrays) -> List[str]:
    """The names of the unevaluated operations that ``arrays`` need, view-only ones apart."""
    import tempfile

    import mlx.core as mx

    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as f:
        mx.export_to_dot(f.name, *arrays)
        names = [line.split('label ="')[1].split('"')[0] for line in open(f.name) if 'label ="' in line]
    return [n for n in names if n not in VIEWS]


def primitives_per_block(flash) -> dict:
    """Operations one MoE block runs for one decoded token (view-only ones apart): a proxy for its kernel
    launches. The streaming block synchronizes midway, so its count is what its router (and the next
    layer's, predicting) needs before the synchronization plus what the output needs after it."""
    import mlx.core as mx

    from ..engine.streaming_moe import StreamingMoE, route

    index = min(flash.bank.layers)
    module = flash.model.layers[index].mlp
    block = module if isinstance(module, StreamingMoE) else module.block
    hidden = flash.bank.arrays(index)["down_proj.weight"].shape[1]
    x = mx.random.normal((1, 1, hidden)).astype(block.shared_expert.down_proj.scales.dtype
                                               if block.shared else mx.float32)
    mx.eval(x)
    names = []
    if isinstance(module, StreamingMoE) and not flash.bank.complete(index):  # synchronizes after its routers
        following = module.next_block
        routers = [route(module, x)[0]]
        if following is not None and not flash.bank.complete(following.layer):
            guess, likelihood = route(following, x)
            routers += [guess, likelihood.astype(mx.float32)]
        names += count_primitives(*routers)
    y = module(x)
    names += count_primitives(y)
    mx.eval(y)
    return {"count": len(names), "operations": {n: names.count(n) for n in sorted(set(names))}}


# ------------------------------------------------------------------------------ one bank size


@dataclass
class BankRun:
    """The engine with one bank size on one stream of new tokens (warm-up, then timed): what it read, how
    fast, against LRU and Belady's MIN of the same capacity replayed on the same requests."""

    bank_fraction: float
    prefetch: bool = True
    bank_gb: float = 0.0
    bank_slots: int = 0
    warmup_tokens: int = 0
    timed_tokens: int = 0
    ms_per_token: Optional[float] = None
    records_read_per_token: float = 0.0  # demand reads and reads ahead, after the warm-up
    lru_records_per_token: float = 0.0
    min_records_per_token: float = 0.0
    vs_lru: Optional[float] = None  # records read / LRU's
    min_vs_lru: Optional[float] = None
    # a cache knowing the exact routing of the next 1 / 8 tokens (and nothing further), against LRU: what any
    # predictor of the coming tokens could gain at most (cache_replay.horizon_misses)
    next_token_oracle_vs_lru: Optional[float] = None
    next_8_tokens_oracle_vs_lru: Optional[float] = None
    bytes_read_per_token: float = 0.0
    lru_bytes_per_token: float = 0.0
    bank_hit_rate: float = 0.0
    lru_hit_rate_same_capacity: float = 0.0
    prefetch_reads_per_token: float = 0.0
    prefetch_hit_rate: float = 0.0  # of the records read ahead, the share the layer's next call asked for
    prediction_recall: float = 0.0
    read_wait_ms_per_token: float = 0.0
    router_ms_per_token: float = 0.0
    peak_rss_gb: float = 0.0
    drop_page_cache: bool = True
    memory_limit_gb: Optional[float] = None
    cgroup_peak_gb: Optional[float] = None
    cgroup_file_gb_at_end: Optional[float] = None


def bank_run(model_dir: Path, k: int, fraction: float, warmup: List[int], timed: List[int], read_threads: int,
             drop_page_cache: Optional[bool] = None, cold: bool = True, prefetch: bool = True) -> BankRun:
    """Decode ``warmup`` then ``timed`` new tokens in one stream with a bank of ``fraction`` of all experts,
    starting empty (the layer files evicted first when ``cold``); figures are of the timed tokens."""
    from ..engine.loader import all_experts_bytes, load_flash_model
    from ..flash_layout import Manifest

    manifest = Manifest.load(model_dir)
    everything = all_experts_bytes(manifest)
    flash = load_flash_model(model_dir, experts_per_token=k, bank_bytes=int(round(fraction * everything)),
                             read_threads=read_threads, drop_page_cache=drop_page_cache, prefetch=prefetch)
    try:
        if cold:
            drop_from_page_cache([model_dir / l.file for l in manifest.expert_layers])
        requests = Requests(flash.bank)
        result = BankRun(fraction, prefetch=prefetch, bank_gb=round(flash.bank.nbytes / 1e9, 3),
                         bank_slots=flash.bank.slots, warmup_tokens=len(warmup), timed_tokens=len(timed),
                         drop_page_cache=flash.bank.drop_page_cache)
        marks = {}

        def at_timed():
            marks["calls"], marks["stats"] = len(requests.calls), replace(flash.bank.stats)

        result.ms_per_token = _r(decode_stream(flash.model, warmup, timed, at_timed))
        during = flash.bank.stats.since(marks["stats"])
        n, record = len(timed), manifest.expert_layers[0].layout.record_size
        lru = lru_misses(requests.calls, flash.bank.slots, count_from=marks["calls"])
        best = min_misses(requests.calls, flash.bank.slots, count_from=marks["calls"])
        result.records_read_per_token = _r(during.reads / n)
        result.lru_records_per_token, result.min_records_per_token = _r(lru / n), _r(best / n)
        result.vs_lru = _r3(during.reads / lru) if lru else None
        result.min_vs_lru = _r3(best / lru) if lru else None
        if lru and fraction < 1:
            layers = len(manifest.expert_layers)
            for tokens, field_name in ((1, "next_token_oracle_vs_lru"), (8, "next_8_tokens_oracle_vs_lru")):
                seen = horizon_misses(requests.calls, flash.bank.slots, tokens * layers, count_from=marks["calls"])
                setattr(result, field_name, _r3(seen / lru))
        result.bytes_read_per_token = during.bytes_read / n
        result.lru_bytes_per_token = lru * record / n
        result.bank_hit_rate = _r3(during.hit_rate)
        result.lru_hit_rate_same_capacity = _r3(1 - lru / during.requested)
        result.prefetch_reads_per_token = _r(during.prefetch_reads / n)
        result.prefetch_hit_rate = _r3(during.prefetch_hit_rate)
        result.prediction_recall = _r3(during.prediction_recall)
        result.read_wait_ms_per_token = _r(during.read_wait_seconds * 1000 / n)
        result.router_ms_per_token = _r((during.router_launch_seconds + during.router_wait_seconds) * 1000 / n)
        result.peak_rss_gb = peak_rss_gb()
        return result
    finally:
        flash.close()


def bank_run_capped(model_dir: Path, k: int, fraction: float, warmup: List[int], timed: List[int],
                    prefetch: bool, opts: BenchOptions, log) -> BankRun:
    """``bank_run`` in a child process under a cgroup v2 ``memory.max`` of ``opts.memory_limit_gb``
    (reads dropped from the page cache as on unified memory); skipped with a note where cgroups are not
    available."""
    group = Path("/sys/fs/cgroup") / f"flash-moe-bench-{os.getpid()}"
    limit = int(opts.memory_limit_gb * 1e9)
    try:
        root = Path("/sys/fs/cgroup")
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limit))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
    except OSError as e:
        log(f"  memory limit skipped: no writable cgroup v2 memory controller ({e.strerror})")
        return bank_run(model_dir, k, fraction, warmup, timed, opts.read_threads, True, prefetch=prefetch)
    args = {"model_dir": str(model_dir), "k": k, "fraction": fraction, "warmup": warmup, "timed": timed,
            "read_threads": opts.read_threads, "prefetch": prefetch}
    procs = str(group / "cgroup.procs")

    def enter():
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    try:
        done = subprocess.run([sys.executable, "-m", "llm_flash_moe.measure.benchmark", json.dumps(args)],
                              preexec_fn=enter, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the capped decode failed (exit {done.returncode}): {tail}")
        result = BankRun(**json.loads(done.stdout.strip().splitlines()[-1]))
        result.memory_limit_gb = opts.memory_limit_gb
        peak = group / "memory.peak"
        if peak.exists():
            result.cgroup_peak_gb = round(int(peak.read_text()) / 1e9, 2)
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        result.cgroup_file_gb_at_end = round(int(stat.get("file", 0)) / 1e9, 2)
        return result
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------------------ one configuration


def bench_one(model_dir: Path, k: int, opts: BenchOptions, log) -> dict:
    import mlx.core as mx

    from ..engine.loader import all_experts_bytes, load_flash_model
    from ..flash_layout import Manifest
    from ..synthetic.flash_model import layer_ginis

    manifest = Manifest.load(model_dir)
    record = manifest.expert_layers[0].layout.record_size
    everything = all_experts_bytes(manifest)
    files = [model_dir / l.file for l in manifest.expert_layers]
    supply = Tokens()
    name = f"{manifest.expert_layers[0].quantization.bits}-bit k={k}"
    result = {"bits": manifest.expert_layers[0].quantization.bits, "experts_per_token": k, "record_bytes": record,
              "layers": len(manifest.expert_layers), "experts_per_layer": manifest.num_experts,
              "warmup_tokens": opts.warmup_tokens, "timed_tokens": opts.tokens,
              "all_experts_gb": round(everything / 1e9, 2)}
    full = max(opts.bank_fractions) >= 1  # else only the partial banks are timed (the floors still are)

    # The engine with a bank for every expert, filled by use: a stream of new tokens (also the routing trace).
    flash = load_flash_model(model_dir, experts_per_token=k, bank_bytes=everything, read_threads=opts.read_threads)
    requests = Requests(flash.bank)
    drop_from_page_cache(files)
    marks = {}
    warm = decode_stream(flash.model, supply.take(opts.warmup_tokens), supply.take(opts.tokens),
                         lambda: marks.update(calls=len(requests.calls), stats=replace(flash.bank.stats)))
    during = flash.bank.stats.since(marks["stats"])
    trace = requests.calls[marks["calls"]:]  # the timed tokens' requests
    result["routing"] = routing_stats(by_layer(requests.calls), manifest.num_experts, during.prediction_recall)
    result["routing"]["gini"]["published_at_these_depths"] = layer_ginis(len(manifest.expert_layers))
    logit_tokens = supply.take(opts.tokens + 1)
    engine_logits = decode_logits(flash.model, logit_tokens)
    result["primitives_per_moe_block"] = {"engine": primitives_per_block(flash)}
    n = opts.tokens
    result["first_stream"] = {  # the bank of every expert, filled by use from empty, read-ahead as by default
        "bank_gb": round(flash.bank.nbytes / 1e9, 3), "ms_per_token": _r(warm), "bank_hit_rate": _r3(during.hit_rate),
        "bytes_read_per_token": during.bytes_read / n,
        "router_ms_per_token": _r((during.router_launch_seconds + during.router_wait_seconds) * 1000 / n),
        "read_wait_ms_per_token": _r(during.read_wait_seconds * 1000 / n)}
    if full:
        log(f"  {name}: engine, bank of every expert filled by use: {warm:.1f} ms/token on new tokens "
            f"after {opts.warmup_tokens} (hit rate {during.hit_rate:.3f})")

    # A bank that holds every expert of the model: each layer picks its slots on the device, no host sync.
    preloaded_logits = None
    if full:
        flash.bank.fill()
        before = replace(flash.bank.stats)
        preloaded = median_ms(flash.model, supply, opts.tokens, opts.repeats)
        during = flash.bank.stats.since(before)
        result["primitives_per_moe_block"]["engine_preloaded"] = primitives_per_block(flash)
        result["preloaded_bank"] = {"ms_per_token": _r(preloaded), "bank_hit_rate": _r3(during.hit_rate)}
        preloaded_logits = decode_logits(flash.model, logit_tokens)
        log(f"  {name}: engine, bank filled with every expert (no host sync): {preloaded:.1f} ms/token")

    # mlx-lm with every expert resident, and the sync floor.
    resident = sync_floor = None
    memory = machine()["memory_gb"]
    if memory and everything < memory * 1e9 / 2:
        flash.bank.resize(0)  # make room
        restore = with_resident_experts(flash)
        resident = median_ms(flash.model, supply, opts.tokens, opts.repeats)
        reference = decode_logits(flash.model, logit_tokens)
        result["primitives_per_moe_block"]["mlx_lm"] = primitives_per_block(flash)
        for block in restore.blocks:
            block.synchronize = True
        sync_floor = median_ms(flash.model, supply, opts.tokens, opts.repeats)
        restore()
        mx.clear_cache()
        result["agreement_with_mlx_lm"] = agreement(engine_logits, reference)
        if preloaded_logits is not None:
            result["agreement_with_mlx_lm_preloaded"] = agreement(preloaded_logits, reference)
        log(f"  {name}: mlx-lm all experts resident {resident:.1f}, with a host sync per layer {sync_floor:.1f} "
            f"ms/token; logits {result['agreement_with_mlx_lm']}")
    flash.close()
    mx.clear_cache()
    result["resident_ms_per_token"] = _r(resident)
    result["sync_floor_ms_per_token"] = _r(sync_floor)

    # Reads: every routed record from the page cache (warm), and the disk cold.
    read_records(model_dir, manifest, trace, opts.read_threads)  # into the page cache
    result["warm_io_floor_ms_per_token"] = _r(read_records(model_dir, manifest, trace, opts.read_threads)
                                              * 1000 / opts.tokens)
    gbps = cold_disk_gbps(model_dir, manifest, trace, opts.read_threads)
    result["cold_disk_gbps"] = _r3(gbps)
    log(f"  {name}: warm io floor {result['warm_io_floor_ms_per_token']} ms/token, cold disk {result['cold_disk_gbps']} GB/s")

    runs = []
    for fraction in opts.bank_fractions:
        warmup, timed = supply.take(opts.warmup_tokens), supply.take(opts.tokens)  # the same stream for each
        for prefetch in opts.prefetch:
            if opts.memory_limit_gb and fraction < 1:
                run = asdict(bank_run_capped(model_dir, k, fraction, warmup, timed, prefetch, opts, log))
            else:
                run = asdict(bank_run(model_dir, k, fraction, warmup, timed, opts.read_threads, prefetch=prefetch))
            missed_s = run["bytes_read_per_token"] / (gbps * 1e9) if gbps else None
            run["target_ms_per_token"] = (_r(TARGET_RATIO * (sync_floor + 1000 * missed_s))
                                          if sync_floor and missed_s is not None else None)
            run["bytes_read_per_token"] = int(run["bytes_read_per_token"])
            run["lru_bytes_per_token"] = int(run["lru_bytes_per_token"])
            run["projected_60_layers_ms_per_token"] = projection(run, len(manifest.expert_layers))
            run["vs_sync_floor"] = _r3(run["ms_per_token"] / sync_floor) if sync_floor else None
            run["vs_target"] = _r3(run["ms_per_token"] / run["target_ms_per_token"]) if run["target_ms_per_token"] else None
            runs.append(run)
            log(f"  {name}: bank {fraction:.2f}, read-ahead {'on' if prefetch else 'off'}: {run['ms_per_token']} "
                f"ms/token, records/token {run['records_read_per_token']} = {run['vs_lru']} x LRU "
                f"(MIN {run['min_vs_lru']}, next-token oracle {run['next_token_oracle_vs_lru']}, 8 tokens "
                f"{run['next_8_tokens_oracle_vs_lru']} x LRU), hit rate {run['bank_hit_rate']}")
    result["banks"] = runs
    result["peak_rss_gb"] = peak_rss_gb()
    return result


APPLE_SSD_GBPS = (5.0, 17.0)  # a fast and the fastest Apple SSD, for the projection


def projection(run: dict, layers: int, depth: int = 60) -> dict:
    """A PROJECTION, not a measurement: ms/token at ``depth`` layers on SSDs of ``APPLE_SSD_GBPS``, from
    this run's parts: the time not spent waiting for reads, and the bytes read, both per layer, scaled to
    ``depth`` layers, the reads added at each bandwidth without overlap (an upper bound for them)."""
    compute = (run["ms_per_token"] - run["read_wait_ms_per_token"]) * depth / layers
    reads = run["bytes_read_per_token"] * depth / layers
    return {f"{gbps:g}_gbps": _r(compute + reads / (gbps * 1e6)) for gbps in APPLE_SSD_GBPS}


def prefill_runs(model_dir: Path, k: int, opts: BenchOptions, log) -> List[dict]:
    """Prompts of ``opts.prompt_tokens`` tokens with the smallest partial bank: the layer-major prefill
    (``prefill.layer_major_prefill``) against mlx-lm's chunked prompt loop over the same engine: bytes read
    against the union of the experts the prompt needs, time to the first token, peak memory."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from ..engine.loader import all_experts_bytes, load_flash_model
    from ..flash_layout import Manifest
    from ..engine.prefill import layer_major_prefill

    manifest = Manifest.load(model_dir)
    fraction = min([f for f in opts.bank_fractions if f < 1] or [1.0])
    flash = load_flash_model(model_dir, experts_per_token=k, read_threads=opts.read_threads,
                             bank_bytes=int(round(fraction * all_experts_bytes(manifest))))
    files = [model_dir / l.file for l in manifest.expert_layers]
    record = manifest.expert_layers[0].layout.record_size
    out = []
    try:
        for length in [n for n in opts.prompt_tokens if n]:
            ids = [t % WALK_TOKENS for t in range(length)]  # the ids whose embeddings walk (see Tokens)
            row = {"prompt_tokens": length, "bank_fraction": fraction}
            for how in ("layer_major", "mlx_lm_chunked"):
                flash.bank.clear()
                drop_from_page_cache(files)
                requests = Requests(flash.bank)
                before = replace(flash.bank.stats)
                mx.reset_peak_memory()
                cache = make_prompt_cache(flash.model)
                start = time.perf_counter()
                if how == "layer_major":
                    layer_major_prefill(flash.model, cache, ids[:-1])
                    mx.eval(flash.model(mx.array([ids[-1:]]), cache=cache))
                else:
                    for _ in generate_step(mx.array(ids), flash.model, max_tokens=0, prompt_cache=cache):
                        pass
                seconds = time.perf_counter() - start
                during = flash.bank.stats.since(before)
                union = len({(layer, e) for layer, experts in requests.calls for e in experts})
                row[how] = {"seconds_to_first_token": _r(seconds), "gb_read": _r3(during.bytes_read / 1e9),
                            "union_gb": _r3(union * record / 1e9),
                            "vs_union": _r3(during.bytes_read / (union * record)) if union else None,
                            "mlx_peak_memory_gb": _r3(mx.get_peak_memory() / 1e9)}
                del cache
                mx.clear_cache()
            row["peak_rss_gb"] = peak_rss_gb()
            log(f"  prefill {length} tokens, bank {fraction:.2f}: {json.dumps(row)}")
            out.append(row)
    finally:
        flash.close()
    return out


def peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 2)


def machine() -> dict:
    import mlx.core as mx

    from ..bank.memory import total_memory

    memory = total_memory()
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "memory_gb": round(memory / 1e9, 1) if memory else None, "mlx_device": str(mx.default_device()),
            "mlx": mx.__version__, "python": platform.python_version()}


def _r(v):
    return None if v is None else round(float(v), 2)


def _r3(v):
    return None if v is None else round(float(v), 3)


def synthetic_model_dir(directory: Path, layers: int, experts_per_layer: int, bits: int) -> Path:
    """Where the bench keeps (and reuses) the synthetic model of these settings."""
    return Path(directory) / f"qwen397-shape-{layers}l-{experts_per_layer}e-{bits}bit"


def run(opts: BenchOptions, log=print) -> dict:
    from ..registry import root
    from ..synthetic.flash_model import write_synthetic_model

    directory = Path(opts.directory or root() / "bench")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "options": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}}
    out["routing_calibration"] = routing_calibration(directory, opts, log)
    results = []
    for bits in opts.bits:
        model_dir = synthetic_model_dir(directory, opts.layers, opts.experts_per_layer, bits)
        log(f"synthetic model {model_dir} (built once, reused)")
        write_synthetic_model(model_dir, layers=opts.layers, bits=bits, experts_per_layer=opts.experts_per_layer)
        for k in opts.experts if opts.decode else ():
            results.append(bench_one(model_dir, k, opts, log))
        if any(opts.prompt_tokens):
            out.setdefault("prefill", []).append(
                {"bits": bits, "experts_per_token": max(opts.experts),
                 "runs": prefill_runs(model_dir, max(opts.experts), opts, log)})
    out["results"] = results
    return out


if __name__ == "__main__":  # the capped decode's child process (see bank_run_capped)
    args = json.loads(sys.argv[1])
    done = bank_run(Path(args["model_dir"]), args["k"], args["fraction"], args["warmup"], args["timed"],
                    args["read_threads"], drop_page_cache=True, prefetch=args["prefetch"])
    print(json.dumps(asdict(done)))
