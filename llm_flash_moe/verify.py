"""`llm flash-moe verify`: every expert record and the resident weights against the manifest's checksums.

Layer files are read sequentially in large chunks (the whole model once, at disk speed); each record's
CRC-32 is compared with the one the converter stored when it wrote the record. Damage is reported per
record (``layer L expert E``) so that ``llm flash-moe prepare ... --repair`` rewrites only what is bad.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from .flash_layout import (TOKENIZER_VOCAB_FILES, Manifest, file_checksum, has_tokenizer, read_small,
                           record_checksum)

CHUNK_BYTES = 64 << 20
CHECKSUM_THREADS = min(8, os.cpu_count() or 1)  # zlib.crc32 releases the GIL: records are checked in parallel


@dataclass
class Report:
    bad_experts: Dict[Tuple[int, int], str] = field(default_factory=dict)  # (layer, expert) -> what is wrong
    problems: List[str] = field(default_factory=list)  # whole files: missing, wrong size, resident damage
    records: int = 0  # expert records checked
    checked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_experts and not self.problems

    def lines(self) -> List[str]:
        """One line per problem: whole files first, then each damaged record."""
        out = list(self.problems)
        out += [f"layer {layer} expert {e}: {why}" for (layer, e), why in sorted(self.bad_experts.items())
                if why != "missing"]
        return out

    def summary(self) -> str:
        parts = []
        if self.bad_experts:
            layers = {layer for layer, _ in self.bad_experts}
            parts.append(f"{len(self.bad_experts)} damaged expert record{'s' * (len(self.bad_experts) != 1)} "
                         f"in {len(layers)} layer{'s' * (len(layers) != 1)}")
        if self.problems:
            n = len(self.problems)
            parts.append(f"{n} damaged or missing file{'s' * (n != 1)}")
        return ", ".join(parts) or "intact"


def verify_model(model_dir: Path, manifest: Manifest, progress: bool = False) -> Report:
    """Check every layer file's size and records, the resident files and config.json of ``model_dir``."""
    from huggingface_hub.utils import tqdm

    model_dir = Path(model_dir)
    report = Report()
    total = manifest.expert_bytes + manifest.resident_bytes
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Verifying {manifest.name}",
              disable=not progress) as bar:
        for layer in manifest.expert_layers:
            _verify_layer(model_dir, layer, report, bar)
        for entry in manifest.resident_files:
            _verify_resident(model_dir, entry, report, bar)
    report.problems += metadata_problems(model_dir, manifest)
    if not manifest.files:  # a model of format version 1: its metadata has no checksums
        try:
            json.loads(read_small(model_dir / "config.json", 1 << 20))
        except (OSError, ValueError, RecursionError) as e:
            report.problems.append(f"config.json is missing or damaged ({type(e).__name__})")
    if not has_tokenizer(model_dir):
        report.problems.append(f"the tokenizer is missing (none of {', '.join(TOKENIZER_VOCAB_FILES)})")
    return report


def metadata_problems(model_dir: Path, manifest: Manifest) -> List[str]:
    """config.json, the tokenizer files and the chat template against the sizes and checksums the manifest
    recorded (small files: cheap enough to check on every load)."""
    problems = []
    for entry in manifest.files:
        path = Path(model_dir) / entry["file"]
        try:
            if path.is_symlink() or not path.is_file():
                problems.append(f"{entry['file']} is {'missing' if not path.exists() else 'not a regular file'}")
            elif path.stat().st_size != entry["bytes"]:
                problems.append(f"{entry['file']} has {path.stat().st_size:,} bytes, expected {entry['bytes']:,}")
            elif file_checksum(path) != entry["checksum"]:
                problems.append(f"{entry['file']}: checksum mismatch (damaged)")
        except OSError as e:
            problems.append(f"{entry['file']} is {_missing(e)}")
    return problems


def _verify_layer(model_dir: Path, layer, report: Report, bar) -> None:
    path = model_dir / layer.file
    size = layer.layout.record_size
    if len(layer.checksums) != layer.num_experts:
        report.problems.append(f"layer {layer.layer}: the manifest has no checksums for {layer.file}")
        for e in range(len(layer.checksums), layer.num_experts):
            report.bad_experts[(layer.layer, e)] = "no checksum"
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        report.problems.append(f"layer {layer.layer}: {layer.file} is {_missing(e)} "
                               f"(all {layer.num_experts} experts)")
        report.bad_experts.update({(layer.layer, x): "missing" for x in range(layer.num_experts)})
        bar.update(layer.file_size)
        return
    with f:
        actual = os.fstat(f.fileno()).st_size
        present = min(actual, layer.file_size) // size
        if actual != layer.file_size:
            last = layer.num_experts - 1
            what = ("extra bytes at the end" if present > last
                    else f"expert {last} is missing" if present == last
                    else f"experts {present}-{last} are missing")
            report.problems.append(f"layer {layer.layer}: {layer.file} has {actual:,} bytes, expected "
                                   f"{layer.file_size:,} ({what})")
            report.bad_experts.update({(layer.layer, x): "missing" for x in range(present, layer.num_experts)})
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        per_chunk = max(1, CHUNK_BYTES // size)
        buffers = [memoryview(bytearray(per_chunk * size)) for _ in range(2)]
        starts = list(range(0, present, per_chunk))

        def read(i):  # chunk i into buffer i % 2, while the other one is checksummed
            n = min(per_chunk, present - starts[i])
            return _read_fully(f, buffers[i % 2][:n * size])

        with ThreadPoolExecutor(max_workers=CHECKSUM_THREADS) as pool, ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(read, 0) if starts else None
            for i, e in enumerate(starts):
                got = pending.result()
                if i + 1 < len(starts) and got == min(per_chunk, present - e) * size:
                    pending = reader.submit(read, i + 1)
                view = buffers[i % 2]
                crcs = pool.map(lambda r: record_checksum(view[r * size:(r + 1) * size]), range(got // size))
                for r, crc in enumerate(crcs):
                    if e + r < len(layer.checksums) and layer.checksums[e + r] and crc != layer.checksums[e + r]:
                        report.bad_experts[(layer.layer, e + r)] = "checksum mismatch (damaged)"
                report.records += got // size
                report.checked_bytes += got
                bar.update(got)
                if got < min(per_chunk, present - e) * size:  # the file shrank while being read
                    report.bad_experts.update({(layer.layer, x): "missing" for x in range(e + got // size, present)})
                    break
        bar.update((layer.num_experts - present) * size)


def _verify_resident(model_dir: Path, entry: dict, report: Report, bar) -> None:
    path = model_dir / entry["file"]

    def progress(got):
        report.checked_bytes += got
        bar.update(got)

    try:
        actual = os.stat(path).st_size
        if actual != entry["bytes"]:
            report.problems.append(f"resident weights {entry['file']} have {actual:,} bytes, "
                                   f"expected {entry['bytes']:,}")
            bar.update(entry["bytes"])
            return
        checksum = file_checksum(path, progress, CHUNK_BYTES)
    except OSError as e:
        report.problems.append(f"resident weights {entry['file']} are {_missing(e)}")
        bar.update(entry["bytes"])
        return
    if checksum != entry["checksum"]:
        report.problems.append(f"resident weights {entry['file']}: checksum mismatch (damaged)")


def _read_fully(f, view: memoryview) -> int:
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _missing(e: OSError) -> str:
    return "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror})"
