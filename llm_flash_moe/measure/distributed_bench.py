"""`llm flash-moe bench --ranks N`: the same decode on one rank and on N local ranks, side by side.

The synthetic model of ``benchmark`` (the 397B's per-layer shapes, ``--layers`` deep, ``--experts-per-layer``
experts) decodes the same teacher-forced token streams (each of new tokens)

- on one rank: this process alone, with an expert bank of ``bank_fraction`` of all the experts;
- on N ranks: this process as rank 0 and N-1 worker sessions (``python -m llm_flash_moe.cluster.worker``) on this
  machine, joined over MLX's ring backend on loopback, each with a bank of the same size (so the N banks
  hold N times what one holds), experts owned by the map balanced on the popularity measured on one rank
  over a calibration pass of other tokens (``ownership``; ``ownership="round-robin"`` to compare).

For each experts-per-token setting and each mode: the first stream from empty banks with the expert files
dropped from the page cache (cold), then ``repeats - 1`` warm streams (the banks carry over; new tokens each),
and on N ranks one more warm stream with every MoE ``all_sum`` timed on its own (one more host synchronization per layer,
so its token time is reported apart). Per rank: bytes read per token (cold and warm), MoE ``all_sum``s and
protocol collectives per token, ms per token inside the ``all_sum``s (waiting for the slowest rank
included), and that no rank read an expert it does not own.

All ranks share this machine's CPU, memory, disk and (on a GPU host) GPU: the N-rank figures show the
protocol's cost and each rank's share of the reads, not what N machines would do; ``docs/PERFORMANCE.md``
projects those from these per-rank figures.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..bank.bank_pool import DEFAULT_READ_THREADS, drop_from_page_cache


@dataclass
class ClusterBenchOptions:
    ranks: int = 2
    layers: int = 4
    experts_per_layer: int = 64
    bits: int = 4
    experts: Tuple[int, ...] = (4,)
    tokens: int = 16
    repeats: int = 3
    bank_fraction: float = 1.0  # each rank's bank, as a share of all the experts of the model
    ownership: str = "balanced"  # or "round-robin"
    directory: Optional[Path] = None
    read_threads: int = DEFAULT_READ_THREADS
    join_seconds: float = 600.0  # how long the workers may take to load before rank 0 gives up


def free_ports(n: int) -> List[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def streams(opts: "ClusterBenchOptions") -> List[List[int]]:
    """The token streams of one measurement: the first from an empty bank, then ``repeats - 1`` with what the
    bank kept, each of new tokens (never a pass repeated: a loop over the same tokens flatters any cache).
    One rank and N ranks decode the same streams."""
    from .benchmark import Tokens

    supply = Tokens()
    return [supply.take(opts.tokens + 1) for _ in range(max(2, opts.repeats) + 1)]


def _passes(model, flash, tokens: List[List[int]], repeats: int, before_cold, before_warm=None):
    """(first stream's ms/token, [later streams' ms/token]) of ``benchmark.decode_ms``."""
    from .benchmark import decode_ms

    first = decode_ms(model, tokens[0], before_cold)
    warm = [decode_ms(model, stream, before_warm) for stream in tokens[1:max(2, repeats)]]
    return first, warm


def one_rank(flash, k: int, tokens: List[List[int]], opts: ClusterBenchOptions, files) -> dict:
    from dataclasses import replace

    flash.set_experts_per_token(k)
    timed = len(tokens[0])  # decode_ms runs every token through the model (the first one untimed)
    before = replace(flash.bank.stats)

    def cold():
        flash.bank.clear()
        drop_from_page_cache(files)

    first_stats = {}

    def warm():
        if not first_stats:
            first_stats.update(bytes=flash.bank.stats.bytes_read - before.bytes_read)

    first, passes = _passes(flash.model, flash, tokens, opts.repeats, cold, warm)
    during = flash.bank.stats.since(before)
    warm_bytes = during.bytes_read - first_stats["bytes"]
    return {"first_pass_ms_per_token": _r(first), "ms_per_token": _r(np.median(passes)), "pass_ms": [_r(p) for p in passes],
            "bytes_read_per_token_first_pass": first_stats["bytes"] / timed,
            "bytes_read_per_token": warm_bytes / (timed * len(passes)),
            "read_wait_ms_per_token": _r(during.read_wait_seconds * 1000 / (timed * (len(passes) + 1))),
            "router_ms_per_token": _r((during.router_launch_seconds + during.router_wait_seconds) * 1000
                                      / (timed * (len(passes) + 1)))}


def n_ranks(leader, k: int, tokens: List[List[int]], opts: ClusterBenchOptions, files) -> dict:
    from ..cluster.distributed import FLAG_CLEAR_BANK, FLAG_DROP_PAGE_CACHE
    from ..cluster.leader import LeaderModel

    flash, cluster = leader.flash, leader.cluster
    flash.set_experts_per_token(k)
    model = LeaderModel(flash.model, leader)
    timed = len(tokens[0])
    snapshots = []

    def cold():
        flash.bank.clear()
        drop_from_page_cache(files)
        leader.flags = FLAG_CLEAR_BANK | FLAG_DROP_PAGE_CACHE
        snapshots.append(leader.stats())

    def warm():
        if len(snapshots) == 1:
            snapshots.append(leader.stats())

    cluster.watchdog.arm()
    try:
        first, passes = _passes(model, flash, tokens, opts.repeats, cold, warm)
        after_warm = leader.stats()
        cluster.timed = True
        from .benchmark import decode_ms

        timed_ms = decode_ms(model, tokens[-1])
        cluster.timed = False
        after_timed = leader.stats()
    finally:
        cluster.watchdog.disarm()
    per_rank = []
    n_warm = len(passes)
    for r in range(cluster.size):
        start, mid, end, last = snapshots[0][r], snapshots[1][r], after_warm[r], after_timed[r]
        calls = end["calls"] - start["calls"]
        per_rank.append({
            "rank": r,
            "bytes_read_per_token_first_pass": (mid["bytes_read"] - start["bytes_read"]) / timed,
            "bytes_read_per_token": (end["bytes_read"] - mid["bytes_read"]) / (timed * n_warm),
            "moe_all_sums_per_token": (end["moe_all_sums"] - start["moe_all_sums"]) / calls,
            "moe_all_sum_bytes_per_token": (end["moe_all_sum_bytes"] - start["moe_all_sum_bytes"]) / calls,
            "protocol_collectives_per_token": _r3((end["protocol_collectives"] - start["protocol_collectives"]) / calls),
            "protocol_bytes_per_token": _r((end["protocol_bytes"] - start["protocol_bytes"]) / calls),
            "all_sum_ms_per_token": _r((last["all_sum_seconds"] - end["all_sum_seconds"]) * 1000 / timed),
            "held_not_owned": int(last["held_not_owned"]),
        })
    return {"first_pass_ms_per_token": _r(first), "ms_per_token": _r(np.median(passes)), "pass_ms": [_r(p) for p in passes],
            "timed_pass_ms_per_token": _r(timed_ms), "per_rank": per_rank,
            "bytes_read_per_token_first_pass_all_ranks": sum(p["bytes_read_per_token_first_pass"] for p in per_rank),
            "note": "stats collectives between passes are not counted in the token times"}


def run(opts: ClusterBenchOptions, log=print) -> dict:
    from ..cluster import ring
    from .benchmark import machine, synthetic_model_dir
    from ..cluster.distributed import Cluster, attach
    from ..engine.loader import all_experts_bytes, load_flash_model
    from ..flash_layout import Manifest
    from ..cluster.leader import Leader
    from ..cluster.ownership import Ownership
    from ..registry import root
    from ..synthetic.flash_model import write_synthetic_model

    directory = Path(opts.directory or root() / "bench")
    model_dir = synthetic_model_dir(directory, opts.layers, opts.experts_per_layer, opts.bits)
    log(f"synthetic model {model_dir} (built once, reused)")
    start = time.perf_counter()
    write_synthetic_model(model_dir, layers=opts.layers, bits=opts.bits, experts_per_layer=opts.experts_per_layer)
    manifest = Manifest.load(model_dir)
    everything = all_experts_bytes(manifest)
    bank = int(round(opts.bank_fraction * everything))
    files = [model_dir / l.file for l in manifest.expert_layers]
    tokens = streams(opts)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
           "model": {"layers": opts.layers, "experts_per_layer": opts.experts_per_layer, "bits": opts.bits,
                     "record_bytes": manifest.expert_layers[0].layout.record_size,
                     "all_experts_gb": round(everything / 1e9, 2), "bank_gb_per_rank": round(bank / 1e9, 3)},
           "model_seconds": _r(time.perf_counter() - start)}

    nodes = [[f"127.0.0.1:{p}"] for p in free_ports(opts.ranks)]
    logs = directory / "cluster-bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = []
    for r in range(1, opts.ranks):
        with open(logs / f"rank{r}.log", "w") as f:  # they load, then wait (idle) while rank 0 runs alone
            workers.append(subprocess.Popen([sys.executable, "-m", "llm_flash_moe.cluster.worker", str(model_dir), str(r),
                                             json.dumps(nodes), str(bank)], stdout=f, stderr=subprocess.STDOUT))
    leader = None
    try:
        flash = load_flash_model(model_dir, experts_per_token=opts.experts[0], bank_bytes=bank,
                                 read_threads=opts.read_threads)
        out["bank_slots_per_rank"] = flash.bank.slots
        _wait_listening(workers, logs, opts.join_seconds)  # loaded: nothing competes with the 1-rank passes
        counts = calibrate(flash, opts)
        ownership = (Ownership.balanced({l.layer: l.num_experts for l in manifest.expert_layers}, opts.ranks, counts)
                     if opts.ownership == "balanced" else Ownership.for_model(manifest, opts.ranks))
        out["ownership"] = {"kind": ownership.kind, "digest": ownership.digest(),
                            "calibration_share_per_rank": [
                                _r3(sum(float(np.sum(np.asarray(counts[l])[ownership.owned(l, r)])) for l in counts)
                                    / max(sum(float(np.sum(c)) for c in counts.values()), 1))
                                for r in range(opts.ranks)]}
        results = []
        for k in opts.experts:
            single = one_rank(flash, k, tokens, opts, files)
            log(f"  k={k}: 1 rank: {json.dumps(single)}")
            results.append({"experts_per_token": k, "one_rank": single})
        undo = ring.divert_native_stderr(logs / "rank0-native.log")
        group = ring.init_ring(nodes, 0)
        cluster = Cluster(group, 0, nodes, ownership, manifest.name)
        leader = Leader(flash, cluster, undo)
        cluster.watchdog.arm()
        cluster.handshake(flash)
        cluster.watchdog.disarm()
        attach(flash, cluster)
        for result in results:
            k = result["experts_per_token"]
            many = n_ranks(leader, k, tokens, opts, files)
            result[f"{opts.ranks}_ranks"] = many
            one = result["one_rank"]
            result["vs_one_rank"] = {
                "ms_per_token": _r3(many["ms_per_token"] / one["ms_per_token"]),
                "first_pass_ms_per_token": _r3(many["first_pass_ms_per_token"] / one["first_pass_ms_per_token"]),
                "rank0_bytes_share_first_pass": _r3(many["per_rank"][0]["bytes_read_per_token_first_pass"]
                                                    / max(one["bytes_read_per_token_first_pass"], 1))}
            log(f"  k={k}: {opts.ranks} ranks: {json.dumps(many)}")
        out["results"] = results
    finally:
        if leader is not None:
            leader.stop()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    out["seconds"] = _r(time.perf_counter() - start)
    return out


def calibrate(flash, opts: ClusterBenchOptions) -> dict:
    """Per MoE layer, how often each expert was chosen over a pass of other tokens than the measured ones
    (at the first experts-per-token setting): the popularity the balanced map evens out."""
    from .benchmark import decode_ms

    counts = {l.layer: np.zeros(l.num_experts) for l in flash.manifest.expert_layers}

    def count(layer, experts):
        counts[layer][np.asarray(experts)] += 1

    flash.set_experts_per_token(opts.experts[0])
    start = streams(opts)[-1][-1] + 1  # after every measured stream
    flash.bank.trace = count
    try:
        decode_ms(flash.model, list(range(start, start + opts.tokens + 1)))
    finally:
        flash.bank.trace = None
    return {layer: c.tolist() for layer, c in counts.items()}


def _wait_listening(workers, logs: Path, seconds: float) -> None:
    """Rank 0 connects first and MLX gives up after ~31 s: wait until every worker has loaded the model
    (its log says so) or died."""
    deadline = time.monotonic() + seconds
    for r, w in enumerate(workers, start=1):
        log = logs / f"rank{r}.log"
        while "waiting for rank 0" not in (log.read_text() if log.exists() else ""):
            if w.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker rank {r} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)


def _r(v):
    return None if v is None else round(float(v), 2)


def _r3(v):
    return None if v is None else round(float(v), 3)
