"""Rank 0 of a cluster: the engine (service/) or, with ``keep_alive 0``, the ``llm`` process, leading the
worker ranks (see ``distributed``).

When ``llm flash-moe worker NAME`` runs on this machine (it writes the cluster file), loading NAME joins the
worker ranks (``attach_leader``): the model is wrapped so that every model call is announced to them first
(``LeaderModel``), and each response's generation runs under ``guard``, which arms the watchdog while
cluster work is in flight and turns a lost rank into one line. Without a cluster file nothing changes.

A process forms at most one group (MLX's rule), so after losing its ranks an llm process goes on alone (when
this machine holds every expert) and a new one joins the workers again; an engine ends after that answer,
so that the next command starts one that joins them again.
"""

from __future__ import annotations

import atexit
import os
from typing import Iterator, Optional

import numpy as np

from ..errors import FlashMoeError

_ACTIVE: Optional["Leader"] = None  # the leader of this process, while its group works
_BROKEN: Optional[str] = None  # why this process's group cannot be used any more
_GUARDS = 0  # generations running under guard() (their work is watched)


def active() -> Optional["Leader"]:
    return _ACTIVE


def broken() -> Optional[str]:
    """Why this process cannot lead its cluster any more (it lost its ranks, or could not join them)."""
    return _BROKEN


class LeaderModel:
    """Stands in for the model on rank 0: each call is announced to the workers before it runs."""

    def __init__(self, model, leader: "Leader"):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_leader", leader)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
        return self._leader.call(inputs, cache, input_embeddings, kwargs)


class Leader:
    def __init__(self, flash, cluster, undo_stderr, lock=None):
        from .ring import Watchdog, step_timeout

        self.flash, self.cluster, self.model = flash, cluster, flash.model
        self._undo_stderr, self._lock = undo_stderr, lock
        self._current = None  # the cache list the workers mirror now
        self.flags = 0  # distributed.FLAG_* for the workers with the next call (benchmarks)
        self._in_call = False  # a call was interrupted midway (Ctrl-C): the workers wait inside it
        self.full_copy = flash.manifest.settings.get("shard") is None
        cluster.watchdog = Watchdog(step_timeout(), self._cut, self._hung_message)

    # ------------------------------------------------------------------ model calls

    def call(self, inputs, cache, input_embeddings, kwargs):
        from . import distributed as d

        if self.cluster.broken:
            raise FlashMoeError(self.cluster.broken)
        if input_embeddings is not None or kwargs:
            raise FlashMoeError("a cluster runs model calls on token ids only (no input embeddings)")
        ids = np.array(inputs)  # the previous step's token: evaluated here, as the first layer would anyway
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise FlashMoeError(f"a cluster runs one sequence at a time, not inputs of shape {ids.shape}")
        tokens = ids.reshape(-1).astype(np.int32)
        if cache is None:
            mode = d.MODE_NONE
        elif cache is self._current:
            mode = d.MODE_CONTINUE
        elif d.is_empty(cache):
            mode = d.MODE_FRESH
        else:
            mode = d.MODE_STATE  # a restored prompt-cache state (or any other list): sent once, then continued
        from ..engine.mlx_model import moe_blocks

        k = moe_blocks(self.model)[0][1].top_k
        watchdog = self.cluster.watchdog
        watchdog.kick()
        self._in_call = True
        try:
            flags = self.flags | (d.FLAG_TIMED if self.cluster.timed else 0)
            self.flags = 0
            header = self.cluster.header(d.OP_CALL, k, tokens, mode, flags)
            self.cluster.tokens(header, tokens)
            if mode == d.MODE_STATE:
                self._current = None
                self.cluster.send_state(cache)
        except FlashMoeError as e:  # a rank's routing diverged; the workers already run this call: cut them off
            from .ring import cut_ring

            cut_ring(self.cluster.nodes, 0)
            raise self.fail(str(e)) from None
        if cache is not None:
            self._current = cache
        self.cluster.stats.calls += 1
        out = self.model(inputs, cache=cache)  # every MoE layer's all_sum is scheduled when it returns
        self._in_call = False
        return out

    # ------------------------------------------------------------------ faults

    def _hung_message(self) -> str:
        others = ", ".join(f"rank {r} ({n[0]})" for r, n in enumerate(self.cluster.nodes) if r)
        return (f"{others} did not answer for {self.cluster.watchdog.timeout:g} s (hung, or the network is down); "
                "stopped waiting for the cluster")

    def _cut(self) -> None:
        from .ring import cut_ring

        self.cluster.broken = self._hung_message()
        cut_ring(self.cluster.nodes, 0)

    def lost(self, error: BaseException) -> FlashMoeError:
        """A collective failed: the one line for the user (the cluster is left behind)."""
        if self.cluster.watchdog.fired:
            reason = self._hung_message()
        elif self.cluster.size == 2:
            reason = f"rank 1 ({self.cluster.nodes[1][0]}) left the cluster (connection lost)"
        else:
            reason = f"a rank of the cluster ({', '.join(n[0] for n in self.cluster.nodes[1:])}) left (connection lost)"
        return self.fail(reason)

    def fail(self, reason: str) -> FlashMoeError:
        global _ACTIVE, _BROKEN
        self.cluster.broken = reason
        self.cluster.watchdog.disarm()
        _BROKEN = reason
        _unlock(self._lock)  # another llm process may lead the workers once they restart
        self._lock = None
        if _ACTIVE is self:
            _ACTIVE = None
        if self.full_copy:
            from ..service import client
            from .distributed import attach

            attach(self.flash, None)
            self.flash.model = self.model
            self.flash.cluster = None
            after = ("the engine ends after this answer: the next command starts a new one, which joins the workers "
                     "again" if client.INSIDE_ENGINE else
                     "the next prompt runs on this machine alone (start llm again to rejoin the workers)")
        else:  # this machine holds only rank 0's experts: the model stays unusable in this process
            after = (f"this machine holds only rank 0's experts of {self.flash.manifest.name}, so it cannot go on "
                     "alone: restart the workers and run the command again")
        return FlashMoeError(f"{reason}; {after}")

    # ------------------------------------------------------------------ end

    def _stop_workers(self) -> None:
        from .distributed import OP_STOP

        try:
            self.cluster.header(OP_STOP)
        except Exception:  # noqa: BLE001 - the workers' session ends anyway when this process exits
            pass

    def stop(self) -> None:
        """Tell the workers this process is done (at exit), so their next session starts at once."""
        global _ACTIVE
        if self.cluster.broken or self._in_call:  # mid-call, the workers wait in a layer: just leave
            return
        watchdog = self.cluster.watchdog
        watchdog.arm()
        try:
            self._stop_workers()
        finally:
            watchdog.disarm()
            self.cluster.broken = "stopped"
            if _ACTIVE is self:
                _ACTIVE = None

    def stats(self) -> list:
        """Every rank's counters (``distributed.STATS_FIELDS``) for this session so far."""
        from .distributed import OP_STATS

        watchdog = self.cluster.watchdog
        watchdog.arm()
        try:
            self.cluster.header(OP_STATS)
            return self.cluster.gather_stats(self.flash.bank)
        finally:
            watchdog.disarm()


def attach_leader(flash):
    """Join the worker ranks if ``llm flash-moe worker`` runs a cluster of ``flash``'s model here; returns
    ``flash`` (its model wrapped when it leads a cluster). A model prepared with only rank 0's experts
    refuses to run without its cluster."""
    global _ACTIVE
    from . import distributed as d
    from . import ring
    from .ownership import Ownership

    name = flash.manifest.name
    shard = d.shard_of(flash.manifest)
    config = ring.ClusterConfig.load(name)
    alone = (f"{name} on this machine holds only the experts of rank {shard['rank']} of {shard['ranks']} "
             f"(prepare --rank {shard['rank']} --ranks {shard['ranks']})") if shard else None
    if config is None:
        if shard:
            raise FlashMoeError(f"{alone}: start the other ranks first: mlx.launch --hosts THIS_IP,OTHER_IP,... "
                                f"--backend ring -- llm flash-moe worker {name}")
        return flash
    if _BROKEN is not None or (_ACTIVE is not None and _ACTIVE.flash is not flash):
        reason = _BROKEN or "this process already leads a cluster for another copy of the model"
        if shard:
            raise FlashMoeError(f"{reason}; {alone}: start llm again")
        _warn(f"running {name} on this machine alone: {reason}")
        return flash
    if _ACTIVE is not None:
        return flash
    lock = ring.lock_leadership(name)
    if lock is None:
        reason = "another llm process on this machine is using its cluster"
        if shard:
            raise FlashMoeError(f"{reason}; {alone}, so it cannot run alone: wait for that one to finish")
        _warn(f"running {name} on this machine alone: {reason}")
        return flash
    undo = ring.divert_native_stderr(ring.ClusterConfig.log_path(name))
    try:
        group = ring.init_ring(config.nodes, 0)
    except FlashMoeError as e:
        undo()
        _unlock(lock)
        _mark_broken(str(e))
        if shard:
            raise FlashMoeError(f"{e}; {alone}, so it cannot run alone")
        _warn(f"running {name} on this machine alone: {e}")
        return flash
    cluster = d.Cluster(group, 0, config.nodes, Ownership.from_json(config.ownership), name)
    leader = Leader(flash, cluster, undo, lock)
    leader.cluster.watchdog.arm()
    try:
        cluster.handshake(flash)
    except FlashMoeError as e:
        _mark_broken(str(e))
        raise
    except RuntimeError as e:
        if d.ring_error(e):
            raise leader.lost(e) from None
        raise
    finally:
        leader.cluster.watchdog.disarm()
    d.attach(flash, cluster)
    flash.model = LeaderModel(flash.model, leader)
    flash.cluster = cluster
    _ACTIVE = leader
    if _GUARDS:
        leader.cluster.watchdog.arm()
    atexit.register(leader.stop)
    return flash


def _unlock(fd) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock


def _mark_broken(reason: str) -> None:
    global _BROKEN
    _BROKEN = reason


def _warn(message: str) -> None:
    import click

    click.echo(f"Warning: {message}", err=True)


def guard(events) -> Iterator:
    """Runs a response's generation (an iterator of events) with the watchdog armed while it works (not
    while the consumer holds an event), and turns a lost rank into a FlashMoeError (one line)."""
    global _GUARDS
    from .distributed import ring_error

    it = iter(events)
    try:
        while True:
            _GUARDS += 1
            if _ACTIVE is not None:
                _ACTIVE.cluster.watchdog.arm()
            try:
                event = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                leader = _ACTIVE
                if leader is not None and ring_error(e):
                    raise leader.lost(e) from None
                raise
            finally:
                _GUARDS -= 1
                if _ACTIVE is not None:
                    _ACTIVE.cluster.watchdog.disarm()
            yield event
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
