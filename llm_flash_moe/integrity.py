"""What is ours and what can be trusted: directories `prepare` made (by a marker file it wrote, never by a
file name a user might also use), and user-visible JSON files read strictly (damage is one line naming the
file and the fix; a command that must rewrite a damaged file first keeps the damaged copy aside).

Imports no mlx or numpy: the registry reads through it on every llm command.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .errors import FlashMoeError, one_line
from .flash_layout import (EXPERTS_DIR, MANIFEST_NAME, OWNER_MARKER, OWNER_MARKER_TEXT, PARTIAL_DIR,
                           RESIDENT_WEIGHTS_NAME, VISION_WEIGHTS_NAME, Manifest, read_small)

# JSON files users may edit or damage are small: anything larger is not one of ours.
MAX_JSON_BYTES = 64 << 20


def mark_ours(directory: Path) -> None:
    """Record that `prepare` made (or took over, empty) ``directory``: written before anything else in it."""
    marker = Path(directory) / OWNER_MARKER
    if not marker.exists():
        marker.write_text(OWNER_MARKER_TEXT)


def is_ours(directory: Path) -> bool:
    """``directory`` holds our marker, or (models prepared before the marker existed) a manifest that loads
    as a complete, consistent flash manifest. A manifest.json alone, or a .partial/ folder, is not enough."""
    directory = Path(directory)
    marker = directory / OWNER_MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    if (directory / MANIFEST_NAME).is_file():
        try:
            Manifest.load(directory)
            return True
        except (FlashMoeError, OSError):
            return False
    try:  # an unfinished `prepare` of that time: its plan, as the journal writes it
        plan = json.loads(read_small(directory / PARTIAL_DIR / "plan.json", MAX_JSON_BYTES))
        return isinstance(plan, dict) and {"format_version", "source", "name"} <= set(plan)
    except (OSError, ValueError, RecursionError):
        return False


def refuse_foreign(output: Path) -> None:
    """Refuse (one line) an output `prepare` did not make that holds anything: never written into."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not is_ours(output):
        raise FlashMoeError(f"{output} is not empty and is not a flash-moe model; choose another --output")


def our_entries(directory: Path, metadata_files) -> List[str]:
    """The names in ``directory`` the flash layout (or ``metadata_files``, copied from a source) accounts for."""
    known = {MANIFEST_NAME, MANIFEST_NAME + ".tmp", PARTIAL_DIR, EXPERTS_DIR, RESIDENT_WEIGHTS_NAME,
             RESIDENT_WEIGHTS_NAME + ".tmp", VISION_WEIGHTS_NAME, VISION_WEIGHTS_NAME + ".tmp", OWNER_MARKER,
             "config.json", *metadata_files}
    return sorted(p.name for p in Path(directory).iterdir() if p.name in known)


def remove_ours(directory: Path, metadata_files) -> List[str]:
    """Delete what the layout names in one of our directories, then our marker, and the directory when
    nothing else is in it; returns the names of what was kept (files a user put there)."""
    import shutil

    directory = Path(directory)
    if not directory.exists():
        return []
    for name in our_entries(directory, metadata_files):
        path = directory / name
        if name != OWNER_MARKER and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif name != OWNER_MARKER:
            path.unlink()
    (directory / OWNER_MARKER).unlink(missing_ok=True)  # last: what is left is no longer ours
    kept = sorted(p.name for p in directory.iterdir())
    if not kept:
        directory.rmdir()
    return kept


def read_json(path: Path, fix: str, default=None, check: Optional[Callable[[object], Optional[str]]] = None):
    """The JSON in ``path`` (``default`` when there is none), strictly: a file that cannot be read, is not
    JSON, is too large or too deeply nested, or that ``check`` finds wrong (it returns what is wrong) is a
    FlashMoeError naming the file and ``fix``."""
    path = Path(path)
    try:
        data = json.loads(read_small(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        return default
    except RecursionError:
        raise FlashMoeError(f"{path} is damaged (nested too deeply); {fix}") from None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e, 80)
        raise FlashMoeError(f"{path} is damaged ({why}); {fix}") from None
    problem = check(data) if check is not None else None
    if problem:
        raise FlashMoeError(f"{path} is damaged ({problem}); {fix}")
    return data


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (``NAME.damaged-<time>``) before it is rewritten; returns where."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, aside)
    return aside


# ------------------------------------------------------------------------------ record checksums from pieces


@lru_cache(maxsize=None)
def _shift_tables(length: int) -> tuple:
    """Four 256-entry tables of the linear map that moves a CRC-32 past ``length`` more bytes:
    crc32(A + B) == crc32(B) ^ shift(crc32(A), len(B)) (zlib's crc32_combine, which Python does not offer)."""
    zeros = bytes(length)
    base = zlib.crc32(zeros)
    basis = [zlib.crc32(zeros, 1 << i) ^ base for i in range(32)]
    tables = []
    for k in range(4):
        table = [0] * 256
        for b in range(1, 256):
            low = b & -b
            table[b] = table[b ^ low] ^ basis[8 * k + low.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def combine_crcs(crcs: Sequence[int], lengths: Sequence[int]) -> int:
    """The CRC-32 of consecutive pieces from each piece's own CRC-32 and length (four lookups per piece)."""
    crc = 0
    for i, (piece, length) in enumerate(zip(crcs, lengths)):
        if i == 0:
            crc = piece
            continue
        t0, t1, t2, t3 = _shift_tables(length)
        crc = (t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24]) ^ piece
    return crc


def parallel_checksum(path: Path, threads: int = 8, chunk: int = 64 << 20) -> str:
    """A whole file's CRC-32 (as flash_layout.file_checksum gives it), its chunks read and checksummed on
    ``threads`` threads at once (zlib.crc32 releases the GIL) and combined."""
    from concurrent.futures import ThreadPoolExecutor

    size = os.stat(path).st_size
    starts = range(0, size, chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        def crc(start: int) -> int:
            data = os.pread(fd, min(chunk, size - start), start)
            if len(data) != min(chunk, size - start):
                raise OSError(f"{path} changed while it was read")
            return zlib.crc32(data)

        with ThreadPoolExecutor(max(1, min(threads, len(starts)))) as pool:
            crcs = list(pool.map(crc, starts))
    finally:
        os.close(fd)
    lengths = [min(chunk, size - start) for start in starts]
    return f"{combine_crcs(crcs, lengths) & 0xFFFFFFFF:08x}" if crcs else f"{zlib.crc32(b''):08x}"
