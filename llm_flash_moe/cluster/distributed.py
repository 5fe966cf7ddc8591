"""Expert parallelism across machines over MLX's own distributed layer (``mx.distributed``, ring backend).

Every rank holds the resident model and runs the same model calls in the same order on the same token
ids, so every rank routes identically. Rank ``r`` reads and computes only the chosen experts it owns
(``ownership``) and the ranks add their partial weighted sums with one ``all_sum`` per MoE layer; each
rank then adds the shared expert itself (once).

Roles. Rank 0 is the process the user runs ``llm`` in (the *leader*): it holds the conversation, samples,
prints and logs. Ranks 1..N-1 are *workers* (``llm flash-moe worker``, started on every machine by
``mlx.launch``): they receive token ids from the leader and mirror its model calls.

How the ranks find each other (the cluster file, MLX's ring order, the watchdog): ``ring``. A process
forms one group (MLX's rule), so a worker serves one leader process per *session* (a fresh child process
each time, see ``worker``).

Protocol (all collectives are ``all_sum``s: the sender contributes its data, the others zeros; exact for
integers):

- per model call, one *header* of ``HEADER + N`` int32: ``[op, seq, k, n tokens, mode, flags, 0, 0,
  up to INLINE token ids, routing digest of each rank]``: a decoded token costs this one collective of
  ``4 * (16 + N)`` bytes (72 for N=2) besides the model's MoE ``all_sum``s (one per MoE layer, 4 bytes
  per hidden value); ``n > INLINE`` token ids (prompt chunks) follow in a second collective;
- ``mode``: continue the cache of the previous call, a fresh cache, no cache, or the leader's cache
  state follows (a prompt-cache hit or any other cache list: its arrays are sent, once, then continued);
- each rank writes a digest of every expert choice it made so far into its slot of the header, so
  rank 0 notices, at the next call, a rank whose routing diverged (other hardware or libraries computing
  other values) and stops with an error instead of mixing wrong experts into the answer;
- ``STATS`` gathers the ranks' counters (bytes read, collectives, time in the ``all_sum``s), ``STOP``
  ends a worker's session.

Faults. A rank that dies makes MLX fail the pending collective ("connection to a peer was lost"); a rank
that hangs is cut off by the ``Watchdog`` (no progress for ``timeout`` seconds: it shuts the ring's
sockets down, which turns into the same failure). Either way rank 0 reports one line and goes on alone
when it holds every expert. MLX's own messages about the lost connection go to the cluster log, not the
terminal.

Nothing here imports mlx at module level.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..errors import FlashMoeError
from .ownership import Ownership

PROTOCOL = 1
HEADER = 16  # int32 fields before the ranks' routing digests
INLINE = 8  # token ids that travel inside the header
OP_CALL, OP_STATS, OP_STOP = 1, 2, 3
MODE_CONTINUE, MODE_FRESH, MODE_NONE, MODE_STATE = 0, 1, 2, 3
FLAG_TIMED, FLAG_CLEAR_BANK, FLAG_DROP_PAGE_CACHE = 1, 2, 4  # header[5], for benchmarks
FINGERPRINT_BYTES = 4096
STATS_FIELDS = ("calls", "moe_all_sums", "moe_all_sum_bytes", "all_sum_seconds", "protocol_collectives",
                "protocol_bytes", "state_transfers", "state_bytes", "bytes_read", "expert_reads",
                "held_not_owned", "held")

_DTYPES = ("float32", "float16", "bfloat16", "int32", "uint32", "int64", "uint8", "bool_")


# ------------------------------------------------------------------------------ identity of a rank


def model_digest(manifest) -> str:
    """What must be equal on every rank: the prepared model without its expert checksums and without the
    part saying which experts this copy holds (a shard holds only its own)."""
    data = manifest.to_json()
    settings = {k: v for k, v in data.get("settings", {}).items() if k != "shard"}
    layers = [{k: v for k, v in layer.items() if k != "checksums"} for layer in data["expert_layers"]]
    core = {"config": data["config"], "settings": settings, "expert_layers": layers, "source": data["source"],
            "resident_files": data["resident_files"], "model_type": data["model_type"]}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def shard_of(manifest) -> Optional[dict]:
    """``{"rank", "ranks", "ownership": digest, "kind"}`` when this copy holds only one rank's experts."""
    shard = manifest.settings.get("shard")
    return shard if isinstance(shard, dict) and shard.get("ranks", 1) > 1 else None


def shard_ownership(manifest) -> Optional[Ownership]:
    shard = shard_of(manifest)
    return Ownership.from_json(shard["map"]) if shard else None


def fingerprint(flash, rank: int, size: int) -> dict:
    import mlx.core as mx
    import mlx_lm

    shard = shard_of(flash.manifest)
    return {"protocol": PROTOCOL, "rank": rank, "ranks": size, "model": flash.manifest.name,
            "model_digest": model_digest(flash.manifest), "source": flash.manifest.source,
            "bits": flash.manifest.bits, "host": socket.gethostname(), "device": str(mx.default_device()),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "shard": None if shard is None else {k: shard[k] for k in ("rank", "ranks", "ownership", "kind")}}


def check_fingerprints(prints: List[dict], ownership: Ownership, nodes: List[List[str]]) -> Optional[str]:
    """The first reason the ranks cannot serve together, as one line; None when they can."""
    lead = prints[0]
    for p in prints[1:]:
        where = f"rank {p.get('rank')} ({nodes[p.get('rank', 0)][0]}, host {p.get('host')})"
        if p.get("protocol") != lead["protocol"]:
            return (f"{where} runs another version of llm-flash-moe (protocol {p.get('protocol')}, rank 0 has "
                    f"{lead['protocol']}): install the same version on every machine")
        if p.get("ranks") != lead["ranks"]:
            return f"{where} was started for {p.get('ranks')} ranks, rank 0 for {lead['ranks']}"
        if p.get("model_digest") != lead["model_digest"]:
            return (f"{where} serves {p.get('model')} ({p.get('source')}, {p.get('bits')}-bit), which is not the "
                    f"same prepared model as rank 0's {lead['model']} ({lead['source']}, {lead['bits']}-bit): "
                    "prepare the same source with the same options on every machine")
    for p in prints:
        shard = p.get("shard")
        if shard is None:
            continue
        where = f"rank {p['rank']} ({nodes[p['rank']][0]})"
        if shard["ranks"] != len(prints) or shard["rank"] != p["rank"]:
            return (f"{where} holds the experts of rank {shard['rank']} of {shard['ranks']} (prepare --rank "
                    f"{shard['rank']} --ranks {shard['ranks']}), but runs as rank {p['rank']} of {len(prints)}: "
                    "list the hosts to mlx.launch in the order of their --rank")
        if shard["ownership"] != ownership.digest():
            return (f"{where} holds the experts of another ownership map ({shard['kind']} {shard['ownership']}) "
                    f"than the cluster's ({ownership.kind} {ownership.digest()}): prepare every machine with "
                    "the same --ranks and --popularity, and give the worker the same --popularity")
    return None


# ------------------------------------------------------------------------------ the runtime


@dataclass
class ClusterStats:
    calls: int = 0  # model calls served
    moe_all_sums: int = 0  # one per MoE layer per call
    moe_all_sum_bytes: int = 0
    all_sum_seconds: float = 0.0  # waiting for the MoE all_sums (timed mode, and every one on CUDA)
    protocol_collectives: int = 0  # headers, token ids, cache states, the handshake (not the stats themselves)
    protocol_bytes: int = 0
    state_transfers: int = 0  # cache states sent by rank 0 (prompt-cache hits)
    state_bytes: int = 0


def _dtype_code(dtype) -> int:
    name = str(dtype).split(".")[-1]
    name = "bool_" if name == "bool" else name
    return _DTYPES.index(name)


def _dtype(code: int):
    import mlx.core as mx

    return getattr(mx, _DTYPES[int(code)])


class Cluster:
    """This process's place in the cluster: the group, who owns what, the collectives and their counts."""

    def __init__(self, group, rank: int, nodes: List[List[str]], ownership: Ownership, model: str):
        self.group, self.rank, self.nodes, self.ownership, self.model = group, rank, nodes, ownership, model
        self.size = len(nodes)
        self.owned = {layer: ownership.owned(layer, rank) for layer in ownership.owners}
        self.stats = ClusterStats()
        self.timed = False  # time each MoE all_sum on its own (one more host sync per layer: benchmarks)
        self.broken: Optional[str] = None  # why the group can no longer be used
        self.routing = 0  # digest of every expert choice so far (compared across ranks at each call)
        self.watchdog = None  # a ring.Watchdog on rank 0
        self._seq = 0
        import mlx.core as mx

        # Every collective of this process on one stream of its own: they run in the order they are
        # scheduled, whichever stream the model runs on (mlx-lm's generation stream, or the default one)
        # and whenever their results are needed, so every rank pairs the same collectives.
        self.stream = mx.new_stream(mx.cpu)
        # On MLX's CUDA backend a collective left pending between GPU work (the partial sum in, the next
        # layer's router out) stalled two ranks sharing one H200 from the first token (the GPU waiting on
        # the CPU stream, the bank's copies waiting behind it): there each MoE all_sum runs on evaluated
        # input and is waited for, as the timed mode does. Unified memory (Metal, CPU) keeps it pending.
        self.wait_each_all_sum = mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()

    @property
    def identity(self) -> str:
        """What a model state computed by this cluster depends on (the prompt cache's identity)."""
        return f"{self.size} ranks, ownership {self.ownership.digest()}"

    # ------------------------------------------------------------------ collectives

    def _all_sum(self, array, protocol: bool = True):
        import mlx.core as mx

        out = mx.distributed.all_sum(array, group=self.group, stream=self.stream)
        mx.eval(out)
        if protocol:
            self.stats.protocol_collectives += 1
            self.stats.protocol_bytes += array.nbytes
        return out

    def _broadcast(self, values: np.ndarray):
        """Rank 0's ``values`` on every rank (the others pass zeros of the same shape and dtype)."""
        import mlx.core as mx

        return np.array(self._all_sum(mx.array(values if self.rank == 0 else np.zeros_like(values))))

    def _gather_bytes(self, data: bytes, width: int) -> List[bytes]:
        import mlx.core as mx

        if len(data) > width:
            raise FlashMoeError(f"a handshake message of {len(data)} bytes does not fit {width}")
        row = np.zeros((self.size, width), dtype=np.uint8)
        row[self.rank, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        out = np.array(self._all_sum(mx.array(row)))
        return [bytes(r).rstrip(b"\0") for r in out]

    def handshake(self, flash) -> List[dict]:
        """Every rank's fingerprint, then rank 0's verdict and ownership map; raises FlashMoeError on every
        rank when they cannot serve together (rank 0 says why)."""
        prints = [json.loads(b or b"{}") for b in self._gather_bytes(
            json.dumps(fingerprint(flash, self.rank, self.size)).encode(), FINGERPRINT_BYTES)]
        problem = check_fingerprints(prints, self.ownership, self.nodes) if self.rank == 0 else None
        verdict = np.array([1 if problem else 0, 1 if self.ownership.kind == "balanced" else 0], dtype=np.int32)
        verdict = self._broadcast(verdict)  # first: the map's size is only known to agree once the models do
        if verdict[0]:
            raise FlashMoeError(problem or f"rank 0 refused rank {self.rank}'s settings (rank 0 says why)")
        layers = [layer.layer for layer in flash.manifest.expert_layers]
        width = max(flash.manifest.layer(layer).num_experts for layer in layers)
        table = np.zeros((len(layers), width), dtype=np.int32)
        if self.rank == 0:
            table = self.ownership.table() + 1  # +1: the -1 pads stay apart from the others' zeros
        table = self._broadcast(table) - 1
        kind = "balanced" if verdict[1] else "round-robin"
        self.ownership = Ownership.from_table(self.size, kind, layers, table)
        self.owned = {layer: self.ownership.owned(layer, self.rank) for layer in layers}
        return prints

    # ------------------------------------------------------------------ one MoE layer

    def note_routing(self, chosen: np.ndarray) -> None:
        self.routing = zlib.crc32(np.sort(np.asarray(chosen, dtype="<i4"), axis=-1).tobytes(), self.routing)

    def combine(self, partial, dtype):
        """This rank's partial expert sum -> the sum over all ranks (one all_sum, in float32), as ``dtype``."""
        import mlx.core as mx

        if self.watchdog is not None:
            self.watchdog.kick()
        part = partial.astype(mx.float32)
        total = mx.distributed.all_sum(part, group=self.group, stream=self.stream)
        self.stats.moe_all_sums += 1
        self.stats.moe_all_sum_bytes += part.nbytes
        if self.timed or self.wait_each_all_sum:
            mx.eval(part)
            start = time.perf_counter()
            mx.eval(total)
            self.stats.all_sum_seconds += time.perf_counter() - start
        else:
            mx.async_eval(total)  # scheduled now: every rank runs its collectives in the same order
        return total.astype(dtype)

    def experts(self, block, x, inds, scores):
        """The MoE block's routed experts, summed over the ranks: this rank computes the chosen experts it
        owns (zeros when it owns none of them, still joining the all_sum)."""
        if x.size == x.shape[-1]:
            partial, dtype = self._one_token(block, x, inds, scores)
        else:
            partial, dtype = self._chunk(block, x, inds, scores)
        return self.combine(partial, dtype)

    def _one_token(self, block, x, inds, scores):
        import mlx.core as mx

        from .. import kernels

        predicted = block.predict(x)
        block._synchronize(inds, predicted)
        chosen = np.array(inds).reshape(-1)
        self.note_routing(chosen)
        mine = self.owned[block.layer][chosen]
        ahead = None if predicted is None else block.read_ahead(predicted, self.owned[block.next_block.layer])
        pool = block.bank.arrays(block.layer)
        fused = block.kernel != "twin"  # resolved once, when the block was built
        dtype = x.dtype if fused or not block.shared else mx.float32
        if not mine.any():
            if ahead is not None:
                block.bank.prefetch(*ahead)
            return mx.zeros(x.shape, dtype=mx.float32), dtype
        which = np.nonzero(mine)[0]
        slots = block.bank.lookup(block.layer, chosen[mine], prefetch=ahead)
        chosen_slots = mx.array(slots.astype(np.uint32))
        mine_scores = scores.reshape(-1)[mx.array(which)]
        if fused:
            y = kernels.kernel_glu(x, pool, block.quant, mine_scores, slots=chosen_slots, backend=block.kernel)
            y = y.reshape(x.shape)
        else:
            shape = (*inds.shape[:-1], len(which))
            y = block._weighted(kernels.LoadedSwitchGLU(pool, block.quant)(x, chosen_slots.reshape(shape)),
                                mine_scores.reshape(shape))
        block.bank.retain(block.layer, slots, y)
        return y, dtype

    def _chunk(self, block, x, inds, scores):
        """Several tokens: the (token, expert) pairs whose expert this rank owns, each owned expert read
        once (a group at a time if the bank is smaller); the other pairs add zero."""
        chosen = np.array(inds)
        self.note_routing(chosen.reshape(-1, chosen.shape[-1]))
        unique = np.unique(chosen)
        y = block.pairs(x, chosen, unique[self.owned[block.layer][unique]], scores)
        return y, y.dtype

    # ------------------------------------------------------------------ the per-call protocol

    def header(self, op: int = 0, k: int = 0, tokens: Sequence[int] = (), mode: int = 0, flags: int = 0) -> np.ndarray:
        """Rank 0 sends (op, k, tokens, mode, flags); every rank sends its routing digest. Returns what all got."""
        import mlx.core as mx

        h = np.zeros(HEADER + self.size, dtype=np.int32)
        if self.rank == 0:
            self._seq += 1
            h[:6] = [op, self._seq, k, len(tokens), mode, flags]
            n = min(len(tokens), INLINE)
            h[8:8 + n] = np.asarray(tokens[:n], dtype=np.int32)
        h[HEADER + self.rank] = self.routing & 0x7FFFFFFF
        out = np.array(self._all_sum(mx.array(h), protocol=op != OP_STATS))
        if self.rank != 0 and out[0] == OP_STATS:
            self.stats.protocol_collectives -= 1  # counted above on the workers, who learn the op only now
            self.stats.protocol_bytes -= h.nbytes
        if self.rank == 0 and op == OP_CALL:
            theirs = out[HEADER:]
            for r in range(1, self.size):
                if theirs[r] != (self.routing & 0x7FFFFFFF):
                    raise FlashMoeError(
                        f"rank {r} ({self.nodes[r][0]}) chose other experts than rank 0 before call {self._seq}: "
                        "their computations differ (other hardware, MLX build or model files); run every rank "
                        "on the same kind of machine and software")
        return out

    def tokens(self, header: np.ndarray, tokens: Sequence[int] = ()) -> np.ndarray:
        """The call's token ids (inline, or in a second collective for longer inputs)."""
        n = int(header[3])
        if n <= INLINE:
            return header[8:8 + n].astype(np.int32)
        values = np.asarray(tokens, dtype=np.int32) if self.rank == 0 else np.zeros(n, dtype=np.int32)
        return self._broadcast(values)

    def send_state(self, caches) -> None:
        """Rank 0: its cache list's arrays, for the workers to continue from (``receive_state``)."""
        import mlx.core as mx

        arrays = _state_arrays(caches)
        desc = np.zeros((len(arrays), 7), dtype=np.int32)
        for i, a in enumerate(arrays):
            if a is not None:
                desc[i, :3] = [1, _dtype_code(a.dtype), a.ndim]
                desc[i, 3:3 + a.ndim] = a.shape
        self._broadcast(desc)
        parts = [mx.contiguous(a).view(mx.uint8).reshape(-1) for a in arrays if a is not None]
        if parts:
            blob = mx.concatenate(parts)
            self._all_sum(blob)
            self.stats.state_bytes += blob.nbytes
        self.stats.state_transfers += 1

    def receive_state(self, caches) -> list:
        """Workers: fill ``caches`` (a fresh cache list of the model) with rank 0's state."""
        import mlx.core as mx

        count = len(_state_arrays(caches))
        desc = self._broadcast(np.zeros((count, 7), dtype=np.int32))
        shapes = []
        total = 0
        for row in desc:
            if not row[0]:
                shapes.append(None)
                continue
            dtype, shape = _dtype(row[1]), tuple(int(d) for d in row[3:3 + row[2]])
            nbytes = int(np.prod(shape)) * dtype.size
            shapes.append((dtype, shape, total, nbytes))
            total += nbytes
        blob = self._all_sum(mx.zeros((total,), dtype=mx.uint8)) if total else None
        if blob is not None:
            self.stats.state_bytes += total
        self.stats.state_transfers += 1
        arrays = [None if s is None else blob[s[2]:s[2] + s[3]].view(s[0]).reshape(s[1]) for s in shapes]
        _fill_state(caches, arrays)
        mx.eval([c.state for c in caches])
        return caches

    def gather_stats(self, bank) -> List[dict]:
        """Every rank's counters (``STATS_FIELDS``) for its whole session."""
        import mlx.core as mx

        table = np.zeros((self.size, len(STATS_FIELDS)), dtype=np.float64)
        table[self.rank] = [float(getattr(self.stats, f)) if hasattr(self.stats, f) else float(self._bank_stat(bank, f))
                            for f in STATS_FIELDS]
        out = np.array(self._all_sum(mx.array(table), protocol=False))
        return [dict(zip(STATS_FIELDS, (float(v) for v in row))) for row in out]

    def _bank_stat(self, bank, name: str) -> int:
        if name == "bytes_read":
            return bank.stats.bytes_read
        if name == "expert_reads":
            return bank.stats.reads
        held = [(int(layer), int(expert)) for owner in bank._owner for layer, expert in owner if layer >= 0]
        if name == "held":
            return len(held)
        return sum(1 for layer, expert in held if not self.owned[layer][expert])  # held_not_owned


def _state_arrays(caches) -> list:
    """The arrays of a cache list in a fixed order (None where empty): KV caches their keys and values up to
    their offset, DeltaNet caches their entries."""
    from mlx_lm.models.cache import ArraysCache, KVCache

    out = []
    for c in caches:
        if type(c) is KVCache:
            if c.keys is None:
                out += [None, None]
            else:
                out += [c.keys[..., :c.offset, :], c.values[..., :c.offset, :]]
        elif type(c) is ArraysCache:
            if c.left_padding is not None or c.lengths is not None:
                raise FlashMoeError("a padded (batched) cache cannot be sent to the other ranks")
            out += list(c.cache)
        else:
            raise FlashMoeError(f"the cluster cannot send a {type(c).__name__} cache to the other ranks")
    return out


def _fill_state(caches, arrays) -> None:
    from mlx_lm.models.cache import ArraysCache, KVCache

    i = 0
    for c in caches:
        if type(c) is KVCache:
            keys, values = arrays[i], arrays[i + 1]
            i += 2
            if keys is not None:
                c.keys, c.values, c.offset = keys, values, keys.shape[-2]
        elif type(c) is ArraysCache:
            n = len(c.cache)
            c.cache = list(arrays[i:i + n])
            i += n


def is_empty(caches) -> bool:
    """True for a cache list that has seen no token (as ``make_prompt_cache`` makes it)."""
    from mlx_lm.models.cache import ArraysCache, KVCache

    for c in caches:
        if type(c) is KVCache:
            if c.keys is not None or c.offset:
                return False
        elif type(c) is ArraysCache:
            if any(a is not None for a in c.cache):
                return False
        else:
            return False
    return True


def backbone(model):
    """The module that turns token ids into the last hidden state (the model without its lm_head): what
    the workers run."""
    inner = getattr(model, "language_model", model)
    return inner.model


def ring_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith("[ring]")


def attach(flash, cluster: Optional[Cluster]) -> None:
    """Point every MoE block of ``flash`` at ``cluster`` (None: back to computing every chosen expert)."""
    from ..engine.mlx_model import moe_blocks

    for _, block in moe_blocks(flash.model):
        object.__setattr__(block, "cluster", cluster)
