"""``llm flash-moe worker NAME``: what ``mlx.launch`` runs on every machine of a cluster.

- On rank 0 (the first host given to ``mlx.launch``: the machine you run ``llm`` on) it registers the
  cluster: it writes the cluster file that ``llm -m NAME-flash`` joins (ring addresses, ownership map) and
  waits; stopping it (Ctrl-C on ``mlx.launch``) removes the file, and llm runs alone again.
- On ranks 1..N-1 it serves: one *session* per ``llm`` process on rank 0, each in a fresh child process
  (MLX forms one group per process): load the model, wait for rank 0 to connect, check that both serve
  the same model and ownership, then mirror rank 0's model calls until it stops or is gone; then the next
  session starts.

``python -m llm_flash_moe.cluster.worker MODEL_DIR RANK NODES_JSON [BANK_BYTES]`` is one session (what the
supervisor and the distributed benchmark start).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..errors import FlashMoeError

EXIT_STOPPED, EXIT_LOST, EXIT_FATAL = 0, 1, 2
RESTART_DELAY = 0.2


def say(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------ rank 0: the cluster file


def register_cluster(model_dir: Path, nodes: List[List[str]], popularity: Optional[Path] = None) -> int:
    from .distributed import shard_of, shard_ownership
    from .ring import ClusterConfig
    from ..flash_layout import Manifest
    from .ownership import Ownership

    manifest = Manifest.load(model_dir)
    shard = shard_of(manifest)
    if shard is not None and (shard["rank"] != 0 or shard["ranks"] != len(nodes)):
        raise FlashMoeError(f"this machine holds the experts of rank {shard['rank']} of {shard['ranks']}, but "
                            f"mlx.launch made it rank 0 of {len(nodes)}: list the hosts in the order of their --rank")
    if shard is not None and popularity is not None:
        raise FlashMoeError("--popularity: this machine's copy was prepared for a fixed ownership map already")
    ownership = shard_ownership(manifest) if shard else Ownership.for_model(manifest, len(nodes), popularity)
    config = ClusterConfig(model=manifest.name, nodes=nodes, ownership=ownership.to_json(), pid=os.getpid(),
                           started=time.time())
    stop = _stop_on_signals()
    config.write()
    try:
        say(f"flash-moe cluster for {manifest.name}: {len(nodes)} ranks ({', '.join(n[0] for n in nodes)}), "
            f"experts {ownership.kind}; run `llm -m {manifest.name}-flash ...` on this machine; Ctrl-C stops it")
        while not stop():
            time.sleep(0.5)
    finally:
        config.remove()
    return 0


def _stop_on_signals():
    """A function telling whether to stop: on SIGINT/SIGTERM/SIGHUP, or once the parent (mlx.launch) is gone."""
    stopped = []
    parent = os.getppid()

    def handler(signum, frame):
        stopped.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return lambda: bool(stopped) or os.getppid() != parent


# ------------------------------------------------------------------------------ ranks 1..N-1: sessions


def supervise(model_dir: Path, rank: int, nodes: List[List[str]]) -> int:
    """Run sessions one after the other until stopped."""
    stop = _stop_on_signals()
    say(f"rank {rank} of {len(nodes)} serving {model_dir.name}: waiting for rank 0 ({nodes[0][0]})")
    child = None
    try:
        while not stop():
            child = subprocess.Popen([sys.executable, "-m", "llm_flash_moe.cluster.worker", str(model_dir), str(rank),
                                      json.dumps(nodes)])
            while child.poll() is None:
                if stop():
                    child.terminate()
                    child.wait()
                    return 0
                time.sleep(0.1)
            if child.returncode == EXIT_FATAL:
                return EXIT_FATAL
            time.sleep(RESTART_DELAY)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
    return 0


def session(model_dir: Path, rank: int, nodes: List[List[str]], bank_bytes: Optional[int] = None) -> int:
    """One session: load, join, check, serve. Returns an exit code (EXIT_*)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _die_with_parent()
    from . import distributed as d
    from . import ring
    from ..engine.loader import load_flash_model
    from .ownership import Ownership

    try:
        flash = load_flash_model(model_dir, bank_bytes=bank_bytes)
    except FlashMoeError as e:
        say(f"rank {rank}: {e}")
        return EXIT_FATAL
    name = flash.manifest.name
    ring.divert_native_stderr(ring.ClusterConfig.log_path(name))
    say(f"rank {rank}: {name} loaded, waiting for rank 0 ({nodes[0][0]})")
    try:
        group = ring.init_ring(nodes, rank)  # waits for an llm process on rank 0
        placeholder = Ownership.for_model(flash.manifest, len(nodes))
        cluster = d.Cluster(group, rank, nodes, placeholder, name)
        cluster.handshake(flash)
        d.attach(flash, cluster)
        serve(flash, cluster)
    except FlashMoeError as e:
        say(f"rank {rank}: {e}")
        return EXIT_LOST
    except RuntimeError as e:
        if d.ring_error(e):
            say(f"rank {rank}: rank 0 left the session (connection lost); waiting for the next one")
            return EXIT_LOST
        raise
    finally:
        flash.close()
    return EXIT_STOPPED


def _die_with_parent() -> None:
    """Linux: end this session when its supervisor dies (it may be waiting in MLX's accept, which holds the
    GIL, so it cannot check by itself). Elsewhere the session ends when its next rank 0 leaves."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(flash, cluster) -> None:
    """Mirror rank 0's model calls until it sends STOP."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from . import distributed as d

    model = flash.model
    body = d.backbone(model)
    caches = None
    k = flash.experts_per_token
    while True:
        header = cluster.header()
        op = int(header[0])
        if op == d.OP_STOP:
            return
        if op == d.OP_STATS:
            cluster.gather_stats(flash.bank)
            continue
        if op != d.OP_CALL:
            raise FlashMoeError(f"rank 0 sent an unknown command ({op}): run the same llm-flash-moe everywhere")
        if int(header[2]) != k:
            k = int(header[2])
            flash.set_experts_per_token(k)
        tokens = cluster.tokens(header)
        mode, flags = int(header[4]), int(header[5])
        cluster.timed = bool(flags & d.FLAG_TIMED)
        if flags & d.FLAG_CLEAR_BANK:
            flash.bank.clear()
        if flags & d.FLAG_DROP_PAGE_CACHE:
            from ..bank.bank_pool import drop_from_page_cache

            drop_from_page_cache([flash.directory / layer.file for layer in flash.manifest.expert_layers])
        if mode == d.MODE_FRESH:
            caches = make_prompt_cache(model)
        elif mode == d.MODE_STATE:
            caches = cluster.receive_state(make_prompt_cache(model))
        use = None if mode == d.MODE_NONE else caches
        out = body(mx.array(tokens)[None], use)
        mx.eval(out)
        if use is not None:
            mx.eval([c.state for c in use])
        cluster.stats.calls += 1


def main(argv: List[str]) -> int:
    model_dir, rank, nodes = Path(argv[0]), int(argv[1]), json.loads(argv[2])
    bank_bytes = int(argv[3]) if len(argv) > 3 else None
    return session(model_dir, rank, nodes, bank_bytes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
