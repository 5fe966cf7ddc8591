"""The record of a conversion in progress, so that a re-run continues where the last one stopped.

``<output>/.partial/`` holds ``plan.json`` (what is being converted, with which settings), a lock file,
and ``journal.jsonl``: one JSON object per line, appended only after the bytes it describes were
flushed to disk. A line cut short by a crash is dropped (the file is cut back to its last complete
line before anything is appended, so later runs' lines are never hidden behind it).

The journal is read only once its lock is held: ``Journal(output).lock()`` before anything else.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Dict, List, Set

from ..errors import FlashMoeError
from ..flash_layout import PARTIAL_DIR, write_json_atomic
from . import faults


class Journal:
    def __init__(self, output: Path):
        self.dir = Path(output) / PARTIAL_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "journal.jsonl"
        self.done_units: Set[str] = set()
        self.checksums: Dict[str, str] = {}  # "layer/expert" -> crc
        self.done_shards: Set[str] = set()
        self.staged: Dict[str, str] = {}  # tensor key -> staging file name
        self._pending: List[dict] = []
        self._lock_fd = None

    def _load(self) -> None:
        """Read the journal; cut a line left incomplete by a crash (and anything after it) off the file."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("cut short")
                entry = json.loads(line)
            except ValueError:
                break  # a line cut short by a crash: what it described is redone
            self._apply(entry)
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def _apply(self, entry: dict) -> None:
        if "units" in entry:
            self.done_units.update(entry["units"])
        if "checksums" in entry:
            self.checksums.update(entry["checksums"])
        if "shard" in entry:
            self.done_shards.add(entry["shard"])
        if "staged" in entry:
            self.staged.update(entry["staged"])

    def lock(self) -> None:
        """Hold an exclusive lock on this output for the life of the process; refuse a second converter."""
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise FlashMoeError(
                f"another `llm flash-moe prepare` is writing {self.dir.parent}; wait for it to finish "
                "(or stop it), then run this command again"
            )
        self._load()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def is_empty(self) -> bool:
        """Nothing has been journaled (so nothing in the output can be reused by a re-run)."""
        return not (self.done_units or self.checksums or self.done_shards or self.staged or self._pending)

    def reset(self) -> None:
        """Forget everything: the next conversion starts from the beginning (the lock stays held)."""
        self.done_units.clear()
        self.checksums.clear()
        self.done_shards.clear()
        self.staged.clear()
        self._pending.clear()
        self.path.unlink(missing_ok=True)
        (self.dir / "plan.json").unlink(missing_ok=True)

    def check_plan(self, plan: dict) -> None:
        """Record the plan on the first run; on a re-run insist it is the same conversion."""
        path = self.dir / "plan.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != plan:
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise FlashMoeError(
                    f"{self.dir.parent} holds an unfinished conversion with other settings "
                    f"({', '.join(changed)}); re-run it with the same options or choose another --output"
                )
        else:
            write_json_atomic(path, plan)

    def add(self, entry: dict) -> None:
        self._apply(entry)
        self._pending.append(entry)

    def commit(self, files_to_sync=()) -> None:
        """Make the data durable, then the journal lines that describe it."""
        if not self._pending:
            return
        for fd in files_to_sync:
            os.fsync(fd)
        faults.point("journal")
        with open(self.path, "a") as f:
            for entry in self._pending:
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._pending.clear()
