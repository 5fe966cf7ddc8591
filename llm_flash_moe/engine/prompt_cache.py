"""Prompt-cache reuse: the model's state after a token prefix, kept in memory and on disk.

With experts streamed from disk every prompt token costs reads, so a follow-up turn should process
only what is new. A *snapshot* is the model's cache (attention KV caches and the DeltaNet layers'
conv/recurrent states) after exactly ``tokens``. Qwen3.5's DeltaNet states (mlx-lm's ``ArraysCache``)
cannot be trimmed, so a snapshot is reused only for a prompt whose token ids *start with* exactly its
``tokens``; the rest of the prompt is processed from there.

Snapshots live in this process (``llm chat``: no disk read at all) and on disk under
``<llm user dir>/flash-moe/prompt-cache/<model name>/`` (``llm -c`` in a new process), as safetensors
files (mlx-lm's ``save_prompt_cache`` format) named ``<token count>-<hash>.safetensors``, the hash
covering the model's identity (manifest, experts per token, dtype, device, versions) and the token
ids, so a re-prepared model, another ``-o experts`` or another backend never reuses a stale state.
Files are written atomically (temporary name, then rename). The directory is kept under a byte limit
(``LLM_FLASH_MOE_PROMPT_CACHE_GB``, default 2; 0 turns the disk cache off), least recently used
(mtime) first out; a hit touches its file.

Which prefixes are worth keeping is the session's business (see ``session.Turn``); this module stores,
finds and evicts them. Nothing here imports mlx at module level.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import one_line

FORMAT = "2"  # 2: snapshots carry a checksum of their arrays
DISK_ENV = "LLM_FLASH_MOE_PROMPT_CACHE_GB"
DEFAULT_DISK_GB = 2.0
MEMORY_BYTES = 2 * 10**9  # snapshots held by this process (the newest is kept whatever its size)
MEMORY_ENTRIES = 8
STALE_TMP_SECONDS = 3600  # temporary files older than this are leftovers of a killed writer
THREADS_FILE = "threads.json"  # conversation id -> settings that must stay the same across turns
THREADS_KEPT = 1000


def root() -> Path:
    from .. import registry

    return registry.root() / "prompt-cache"


def disk_limit() -> int:
    """Bytes the on-disk prompt cache may use (``LLM_FLASH_MOE_PROMPT_CACHE_GB``, default 2 GB)."""
    value = os.environ.get(DISK_ENV, "").strip()
    try:
        gb = float(value) if value else DEFAULT_DISK_GB
    except ValueError:
        gb = DEFAULT_DISK_GB
    if not math.isfinite(gb):
        gb = DEFAULT_DISK_GB
    return max(0, int(gb * 1e9))


# ------------------------------------------------------------------------------ snapshots


class Unsupported(Exception):
    """The model uses a cache type whose state we do not know how to snapshot."""


def freeze(caches) -> list:
    """An independent copy of a model cache list (``make_prompt_cache`` / ``load_prompt_cache`` layout).

    KV caches keep only their used part (``[..., :offset, :]``); DeltaNet ``ArraysCache`` lists are
    copied. MLX arrays are values (an update makes a new array), so the copy shares memory with the
    original until either changes and later updates of one never show in the other. The states are
    evaluated, so a snapshot never holds pending work.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    out = []
    for c in caches:
        if type(c) is KVCache:
            if c.keys is None:
                out.append(KVCache())
            else:
                out.append(KVCache.from_state((c.keys[..., :c.offset, :], c.values[..., :c.offset, :], c.offset)))
        elif type(c) is ArraysCache:
            out.append(ArraysCache.from_state((list(c.cache), c.left_padding, c.lengths)))
        else:
            raise Unsupported(type(c).__name__)
    mx.eval([c.state for c in out])
    return out


def supported(caches) -> bool:
    from mlx_lm.models.cache import ArraysCache, KVCache

    return all(type(c) in (KVCache, ArraysCache) for c in caches)


def kv_length(caches) -> Optional[int]:
    """Tokens held by the first attention KV cache (all of them hold the same), None if there is none."""
    from mlx_lm.models.cache import KVCache

    for c in caches:
        if type(c) is KVCache:
            return c.offset
    return None


def nbytes(caches) -> int:
    return sum(c.nbytes for c in caches)


# ------------------------------------------------------------------------------ identity


_MANIFEST_HASHES: Dict[Tuple[str, int], str] = {}


def identity(flash) -> str:
    """What a cached state depends on besides the tokens: the prepared weights (manifest, whose
    checksums cover every file), experts per token, compute dtype and device, mlx / mlx-lm versions."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    manifest = Path(flash.directory) / "manifest.json"
    key = (str(manifest), manifest.stat().st_mtime_ns)
    digest = _MANIFEST_HASHES.get(key)
    if digest is None:
        digest = _MANIFEST_HASHES[key] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    dtype = next((str(v.dtype) for _, v in tree_flatten(flash.model.parameters())
                  if mx.issubdtype(v.dtype, mx.floating)), "none")
    ident = {"format": FORMAT, "manifest": digest, "experts_per_token": flash.experts_per_token, "dtype": dtype,
             "device": str(mx.default_device()), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}
    if flash.cluster is not None:  # experts summed across ranks: another summation order, another state
        ident["cluster"] = flash.cluster.identity
    return json.dumps(ident, sort_keys=True)


def state_checksum(caches) -> str:
    """CRC-32 of every array of a cache list's state, in ``save_prompt_cache``'s order: written into each
    snapshot file and compared when it is read back, so a damaged snapshot is dropped, never used."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    crc = 0
    for _, a in tree_flatten([c.state for c in caches]):
        if isinstance(a, mx.array):
            bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size]
            crc = zlib.crc32(np.ascontiguousarray(np.asarray(a.view(bits))), crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


def _digest(ident: str, tokens: Sequence[int]) -> str:
    import numpy as np

    h = hashlib.sha256(ident.encode())
    h.update(b"\0")
    h.update(np.asarray(tokens, dtype="<i4").tobytes())
    return h.hexdigest()[:40]


# ------------------------------------------------------------------------------ the stores


@dataclass
class Hit:
    caches: list  # a fresh cache list, ready to be extended
    length: int  # tokens it holds: the prompt's first `length` ids
    source: str  # "memory" or "disk"


class MemoryStore:
    """Snapshots held by this process, least recently used out first."""

    def __init__(self, max_bytes: int = MEMORY_BYTES, max_entries: int = MEMORY_ENTRIES):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: "OrderedDict[Tuple[str, Tuple[int, ...]], Tuple[list, int]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def longest(self, ident: str, prompt: Sequence[int]) -> Tuple[int, Optional[list]]:
        """(length, frozen caches) of the longest snapshot that is a proper prefix of ``prompt``."""
        best, found, best_key = 0, None, None
        prompt = tuple(prompt)
        for key, (caches, _) in self._entries.items():
            entry_ident, tokens = key
            n = len(tokens)
            if entry_ident == ident and best < n < len(prompt) and prompt[:n] == tokens:
                best, found, best_key = n, caches, key
        if best_key is not None:
            self._entries.move_to_end(best_key)
        return best, found

    def put(self, ident: str, tokens: Sequence[int], caches: list) -> None:
        key = (ident, tuple(tokens))
        self._entries[key] = (caches, nbytes(caches))
        self._entries.move_to_end(key)
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or
                                          sum(n for _, n in self._entries.values()) > self.max_bytes):
            self._entries.popitem(last=False)


MEMORY = MemoryStore()


def _entries(directory: Path):
    """(token count, digest, path) of the snapshot files in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(".") or not name.endswith(".safetensors"):
            continue
        count, _, digest = name[:-len(".safetensors")].partition("-")
        if count.isdigit() and digest:
            out.append((int(count), digest, directory / name))
    return out


class DiskStore:
    """One model's snapshot files under ``root()/<model name>/``, within a byte limit for the whole root."""

    def __init__(self, directory: Path, limit: Optional[int] = None):
        self.directory = Path(directory)
        self.limit = disk_limit() if limit is None else limit

    def longest(self, ident: str, prompt: Sequence[int], longer_than: int = 0) -> Tuple[int, Optional[list]]:
        from mlx_lm.models.cache import load_prompt_cache

        if self.limit <= 0:
            return 0, None
        prompt = list(prompt)
        for count, digest, path in sorted(_entries(self.directory), reverse=True):
            if not longer_than < count < len(prompt) or digest != _digest(ident, prompt[:count]):
                continue
            try:
                caches, meta = load_prompt_cache(str(path), return_metadata=True)
                if meta.get("identity") != ident or json.loads(meta.get("tokens", "null")) != prompt[:count]:
                    continue
                caches = freeze(caches)  # reads the arrays now: the file may be evicted by another process
                if meta.get("checksum") != state_checksum(caches) or kv_length(caches) not in (None, count):
                    raise ValueError("checksum mismatch")
            except FileNotFoundError:
                continue
            except Exception as e:  # a damaged or foreign file: drop it, never fail the prompt for it
                _warn(f"dropped a damaged prompt-cache snapshot {path} ({one_line(e, 80)}); the prompt is "
                      "processed without it")
                _unlink(path)
                continue
            try:
                os.utime(path)
            except OSError:
                pass
            return count, caches
        return 0, None

    def put(self, ident: str, tokens: Sequence[int], caches: list) -> bool:
        """Write one snapshot (atomically) and evict the least recently used files over the limit."""
        from mlx_lm.models.cache import save_prompt_cache

        size = nbytes(caches)
        if self.limit <= 0 or size > self.limit:
            return False
        path = self.directory / f"{len(tokens)}-{_digest(ident, tokens)}.safetensors"
        tmp = self.directory / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.exists():
                os.utime(path)
            else:
                save_prompt_cache(str(tmp), caches, {"format": FORMAT, "identity": ident,
                                                     "tokens": json.dumps(list(tokens)),
                                                     "checksum": state_checksum(caches)})
                os.replace(tmp, path)
        except Exception as e:  # disk full (MLX raises RuntimeError), read-only, ...: an optimisation, never an error
            _unlink(tmp)
            _warn(f"could not save the prompt cache in {self.directory} ({one_line(e, 100)}); the answer is "
                  "complete, the next turn processes this prompt again")
            return False
        evict(self.limit, keep=path)
        return True


def evict(limit: int, keep: Optional[Path] = None) -> List[Path]:
    """Delete snapshot files (every model's) least recently used first until they fit in ``limit`` bytes."""
    files = []
    now = time.time()
    base = root()
    try:
        models = [base / d for d in os.listdir(base)]
    except OSError:
        return []
    for directory in models:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = directory / name
            try:
                st = path.stat()
            except OSError:
                continue
            if name.startswith(".tmp-"):
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    _unlink(path)
                continue
            if name.endswith(".safetensors"):
                files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        _unlink(path)
        removed.append(path)
        total -= size
    return removed


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class PromptCache:
    """Snapshots of one model, for one identity: this process's memory first, then the disk."""

    def __init__(self, name: str, ident: str, memory: MemoryStore = MEMORY, disk: Optional[DiskStore] = None):
        self.name, self.identity, self.memory = name, ident, memory
        self.disk = disk if disk is not None else DiskStore(root() / name)

    def lookup(self, prompt: Sequence[int]) -> Optional[Hit]:
        """The longest snapshot whose tokens are a proper prefix of ``prompt`` (at least one token is left
        to process), as a fresh cache list, or None."""
        length, caches = self.memory.longest(self.identity, prompt)
        source = "memory"
        disk_length, disk_caches = self.disk.longest(self.identity, prompt, longer_than=length)
        if disk_caches is not None:
            length, caches, source = disk_length, disk_caches, "disk"
            self.memory.put(self.identity, list(prompt[:length]), disk_caches)
        if caches is None:
            return None
        return Hit(freeze(caches), length, source)

    def save(self, tokens: Sequence[int], caches: list) -> bool:
        """Keep a frozen snapshot (see ``freeze``) of the state after ``tokens``; True if it reached the disk."""
        self.memory.put(self.identity, list(tokens), caches)
        return self.disk.put(self.identity, list(tokens), caches)


def forget(name: str) -> None:
    """Delete the snapshots of model ``name`` on disk (the model was removed). Those in this process's
    memory are keyed by the model's identity and go with it."""
    import shutil

    shutil.rmtree(root() / name, ignore_errors=True)


# ------------------------------------------------------------------------------ per-conversation settings


_THREADS: Dict[str, dict] = {}


def _threads_path() -> Path:
    from .. import registry

    return registry.root() / THREADS_FILE


def _read_threads() -> dict:
    """threads.json, strictly: a damaged one is set aside with a warning naming it, never silently replaced."""
    from ..errors import FlashMoeError
    from ..integrity import read_json, set_aside

    path = _threads_path()
    try:
        return read_json(path, "it was set aside", default={},
                         check=lambda d: None if isinstance(d, dict) else "not a JSON object")
    except FlashMoeError as e:
        try:
            aside = set_aside(path)
        except OSError:
            return {}
        _warn(f"{e} as {aside}; the conversations' remembered -o thinking choices start afresh")
        return {}


def recall(conversation_id: Optional[str]) -> dict:
    """Settings this conversation used last (e.g. ``{"thinking": False}``), or {}."""
    if not conversation_id:
        return {}
    if conversation_id in _THREADS:
        return dict(_THREADS[conversation_id])
    entry = _read_threads().get(conversation_id)
    return {k: v for k, v in entry.items() if k != "used"} if isinstance(entry, dict) else {}


def remember(conversation_id: Optional[str], **settings) -> None:
    """Record settings for the conversation's next turns (in this process and on disk)."""
    if not conversation_id:
        return
    _THREADS[conversation_id] = dict(settings)
    data = _read_threads()
    data[conversation_id] = {**settings, "used": time.time()}
    if len(data) > THREADS_KEPT:
        newest = sorted(data.items(), key=lambda kv: kv[1].get("used", 0) if isinstance(kv[1], dict) else 0)
        data = dict(newest[-THREADS_KEPT:])
    path = _threads_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        _unlink(tmp)
