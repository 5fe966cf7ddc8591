"""The ring: how the ranks of a cluster find each other and stay honest, over MLX's ring backend.

- ``ClusterConfig``: the cluster file that ``llm flash-moe worker`` on rank 0's machine writes
  (``<llm user dir>/flash-moe/cluster/<model>.json``: ring addresses, ownership map) and removes when it
  stops; ``llm`` processes there join the cluster it describes.
- ``init_ring``: ``mx.distributed.init(backend="ring")`` for our rank, with the environment (MLX_RANK,
  MLX_HOSTFILE) set here rather than by ``mlx.launch``. MLX's ring connects rank ``i`` to rank ``i+1``:
  every rank but the last accepts a connection first, then connects; the last connects first. Rank 0 (the
  llm process) takes MLX ring position ``N-1`` and worker ``r`` position ``r-1``, so idle workers wait in
  ``accept`` with no time limit and each new llm process joins them at once.
- ``lock_leadership``: one llm process per machine leads a model's cluster at a time (a file lock), so a
  second one runs alone at once instead of waiting on workers that are busy.
- ``Watchdog`` and ``cut_ring``: a rank that stops answering is cut off (its sockets shut down, which makes
  the blocked collective fail like a lost connection).
- ``divert_native_stderr``: MLX's own messages about a lost connection go to the cluster log.

Nothing here imports mlx at module level.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..errors import FlashMoeError

TIMEOUT_ENV = "LLM_FLASH_MOE_CLUSTER_TIMEOUT"  # seconds without progress before a rank counts as hung
DEFAULT_TIMEOUT = 20.0
CUT_GRACE = 10.0  # after cutting a hung ring: seconds before the process exits anyway


def _seconds(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


def step_timeout() -> float:
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)


# ------------------------------------------------------------------------------ the cluster file


def cluster_dir() -> Path:
    from .. import registry

    return registry.root() / "cluster"


@dataclass
class ClusterConfig:
    """What ``llm flash-moe worker`` on rank 0's machine writes for the ``llm`` processes there to join:
    ``<llm user dir>/flash-moe/cluster/<model>.json``, removed when it stops."""

    model: str  # the prepared model's name
    nodes: List[List[str]]  # rank -> ["ip:port", ...] (rank 0: this machine), as mlx.launch numbered them
    ownership: dict  # Ownership.to_json()
    pid: int  # the process that wrote it (the file is stale once it is gone)
    started: float = 0.0

    @property
    def ranks(self) -> int:
        return len(self.nodes)

    @staticmethod
    def path(model: str) -> Path:
        return cluster_dir() / f"{model}.json"

    @staticmethod
    def log_path(model: str) -> Path:
        return cluster_dir() / f"{model}.log"

    def write(self) -> None:
        from ..flash_layout import write_json_atomic

        cluster_dir().mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(self.model), asdict(self))

    @classmethod
    def _read(cls, model: str) -> Tuple["ClusterConfig", bytes]:
        """The cluster file of ``model`` and its bytes; OSError, ValueError, TypeError or RecursionError for a
        missing or damaged one."""
        data = cls.path(model).read_bytes()
        config = cls(**json.loads(data))
        if not isinstance(config.nodes, list) or not isinstance(config.ownership, dict):
            raise TypeError("nodes or ownership")
        return config, data

    @classmethod
    def load(cls, model: str) -> Optional["ClusterConfig"]:
        """The running cluster for ``model``, or None (no file, a damaged one, or its writer is gone)."""
        try:
            config, _ = cls._read(model)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, RecursionError) as e:
            print(f"Warning: {cls.path(model)} is damaged ({type(e).__name__}); running {model} on this machine "
                  "alone: start `llm flash-moe worker` again (it rewrites the file) or delete it", file=sys.stderr)
            return None
        return config if _alive(config.pid) else None

    @classmethod
    def identity(cls, model: str) -> str:
        """The running cluster of ``model`` as an engine leading it is known by: a digest of its cluster
        file, "" without one (no file, a damaged one, or its writer is gone). Quiet: ``load`` warns."""
        import hashlib

        try:
            config, data = cls._read(model)
        except (OSError, ValueError, TypeError, RecursionError):
            return ""
        return hashlib.sha256(data).hexdigest()[:16] if _alive(config.pid) else ""

    def remove(self) -> None:
        try:
            if json.loads(self.path(self.model).read_text()).get("pid") == self.pid:
                self.path(self.model).unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError):
        return True
    return True


def launcher_nodes() -> Tuple[int, List[List[str]]]:
    """(rank, nodes) from the environment ``mlx.launch`` sets (MLX_RANK, MLX_HOSTFILE)."""
    rank, hostfile = os.environ.get("MLX_RANK"), os.environ.get("MLX_HOSTFILE")
    if rank is None or not hostfile:
        raise FlashMoeError("MLX_RANK and MLX_HOSTFILE are not set: start the workers with MLX's launcher, e.g. "
                            "`mlx.launch --hosts IP0,IP1 --backend ring -- llm flash-moe worker NAME`")
    try:
        nodes = json.loads(Path(hostfile).read_text())
        nodes = [[str(a) for a in n] for n in nodes]
        rank = int(rank)
    except (OSError, ValueError, TypeError) as e:
        raise FlashMoeError(f"cannot read the ring hostfile {hostfile} ({e}); start the workers with mlx.launch "
                            "and --backend ring")
    if len(nodes) < 2 or not 0 <= rank < len(nodes):
        raise FlashMoeError(f"the ring hostfile {hostfile} lists {len(nodes)} hosts for rank {rank}: "
                            "give mlx.launch at least two hosts (the first is the machine you run llm on)")
    return rank, nodes


# ------------------------------------------------------------------------------ joining the ring


def ring_position(rank: int, size: int) -> int:
    """MLX ring rank of our rank: the leader (0) last, worker r at r-1 (module docstring)."""
    return (rank - 1) % size


def _addresses(nodes: List[List[str]]) -> List[Tuple[str, int]]:
    out = []
    for node in nodes:
        for address in node:
            host, _, port = address.rpartition(":")
            out.append((host.strip("[]"), int(port)))
    return out


def init_ring(nodes: List[List[str]], rank: int):
    """``mx.distributed.init(backend="ring")`` as our ``rank`` of ``nodes``: the group, or FlashMoeError.

    MLX holds the GIL while it connects, so this cannot be given up early from Python: rank 0 (which
    connects first) waits as long as MLX retries a refused connection (5 attempts, about 31 s) before it
    fails; a worker waits for rank 0 without limit."""
    import mlx.core as mx

    size = len(nodes)
    ring = [nodes[(p + 1) % size] for p in range(size)]  # ring position p holds rank p+1 (the leader: last)
    fd, hostfile = tempfile.mkstemp(prefix="flash-moe-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(ring, f)
    os.environ["MLX_HOSTFILE"] = hostfile
    os.environ["MLX_RANK"] = str(ring_position(rank, size))
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if rank == 0 and "connect" in reason.lower():
            raise FlashMoeError(f"the other ranks ({', '.join(n[0] for n in nodes[1:])}) did not answer ({reason}): "
                                "is `llm flash-moe worker` running there, and the port open?")
        raise FlashMoeError(f"cannot join the ring of {size} ranks: {reason}")
    finally:
        os.unlink(hostfile)
    if group.size() != size:
        raise FlashMoeError(f"MLX formed a group of {group.size()} ranks, not {size}")
    return group


def lock_leadership(model: str):
    """An exclusive lock for the one llm process on this machine that leads ``model``'s cluster: an open
    file descriptor, or None when another process holds it."""
    import fcntl

    cluster_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(cluster_dir() / f"{model}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def cut_ring(nodes: List[List[str]], rank: int) -> int:
    """Shut down this process's sockets to the ring's addresses (our listening address, the others'), so
    that a collective blocked on a hung rank fails; returns how many were cut."""
    addresses = set(_addresses(nodes))
    own = set(_addresses([nodes[rank]]))
    try:
        fds = [int(f) for f in os.listdir("/dev/fd")]
    except OSError:
        fds = list(range(3, 1024))
    cut = 0
    for fd in fds:
        if fd < 3:
            continue
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                try:
                    peer = s.getpeername()[:2]
                except OSError:
                    peer = None
                local = s.getsockname()[:2]
                if peer in addresses or (peer is not None and local in own):
                    s.shutdown(socket.SHUT_RDWR)
                    cut += 1
        except OSError:
            pass
        finally:
            s.detach()
    return cut


def divert_native_stderr(log: Path):
    """Send what native code writes to file descriptor 2 (MLX's ring messages) to ``log``; Python's own
    ``sys.stderr`` keeps the terminal (a wrapper with ``swap_stream``, the engine's, stays in place and
    gets the new stream). Returns a function that undoes it."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return lambda: None
    saved = os.dup(2)
    old_stderr = sys.stderr
    swap = getattr(old_stderr, "swap_stream", None)
    try:
        python_on_fd2 = sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError):
        python_on_fd2 = False
    if python_on_fd2:
        sys.stderr.flush()
        replacement = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old_stderr, "encoding", None),
                                errors=getattr(old_stderr, "errors", None))
        if swap is not None:
            old_stderr = swap(replacement)
        else:
            sys.stderr = replacement
    os.dup2(target, 2)
    os.close(target)

    def undo():
        nonlocal saved
        if saved is None:
            return
        os.dup2(saved, 2)
        os.close(saved)
        saved = None
        if python_on_fd2:
            if swap is not None:
                replaced = swap(old_stderr)
            else:
                replaced, sys.stderr = sys.stderr, old_stderr
            try:
                replaced.close()
            except OSError:
                pass

    return undo


# ------------------------------------------------------------------------------ the watchdog


class Watchdog:
    """Cuts the ring when a rank stops answering: armed while rank 0 runs cluster work, kicked at every
    model call and MoE layer; ``timeout`` seconds without a kick -> ``on_timeout()`` (which cuts the
    ring, so the blocked collective fails), and if the main thread is still stuck ``CUT_GRACE`` seconds
    later, one line on stderr and exit."""

    def __init__(self, timeout: float, on_timeout: Callable[[], None], message: Callable[[], str]):
        self.timeout, self.on_timeout, self.message = timeout, on_timeout, message
        self._deadline: Optional[float] = None
        self._fired_at: Optional[float] = None
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="flash-moe-watchdog", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        with self._lock:
            self._deadline = time.monotonic() + self.timeout
            self._lock.notify()

    def kick(self) -> None:
        if self._deadline is not None:
            self._deadline = time.monotonic() + self.timeout

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None
            self._fired_at = None

    @property
    def fired(self) -> bool:
        return self._fired_at is not None

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._deadline is None:
                    self._lock.wait()
                    continue
                now = time.monotonic()
                if self._fired_at is not None:
                    if now - self._fired_at > CUT_GRACE:
                        _exit_with(self.message())
                    self._lock.wait(1.0)
                    continue
                if now < self._deadline:
                    self._lock.wait(self._deadline - now)
                    continue
                self._fired_at = now
            try:
                self.on_timeout()
            except Exception:  # noqa: BLE001 - the grace period still ends the process
                pass


def _exit_with(message: str) -> None:
    try:
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(1)
