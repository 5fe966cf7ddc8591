"""Routed experts -> fixed-size records in per-layer files, one expert (slice) at a time.

Every record part is written at its final offset as soon as its source tensor is at hand, so shards
can arrive in any order; a unit of work is one projection of one expert (or one part of it, when an
MLX-quantized source is repacked byte for byte). Peak memory is one expert's source slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..errors import FlashMoeError
from ..flash_layout import PROJECTIONS, ExpertLayer, ExpertQuantization, record_checksum
from . import faults
from .checkpoint import classify
from .journal import Journal
from .safetensors_io import TensorInfo, read_rows, read_tensor

COMMIT_EVERY_BYTES = 256 << 20  # and at the end of every layer: a resumed run redoes less than this


def to_mx(array: np.ndarray, mlx_dtype: str):
    import mlx.core as mx

    a = mx.array(array)
    return a.view(mx.bfloat16) if mlx_dtype == "bfloat16" else a


def to_bytes(array) -> np.ndarray:
    """The raw bytes of an evaluated mlx array, as a flat numpy uint8 array."""
    import mlx.core as mx

    return np.array(mx.contiguous(array).view(mx.uint8)).reshape(-1)


def quantize(w, quant: ExpertQuantization, dtype: Optional[str]) -> List[np.ndarray]:
    """mlx's affine quantization of one expert matrix, as mlx-lm's converter does it: cast, then quantize."""
    import mlx.core as mx

    if dtype is not None and w.dtype != getattr(mx, dtype):
        w = w.astype(getattr(mx, dtype))
    parts = mx.quantize(w, group_size=quant.group_size, bits=quant.bits, mode=quant.mode)
    mx.eval(parts)
    return [to_bytes(p) for p in parts]


@dataclass(frozen=True)
class SourceQuantization:
    bits: int
    group_size: int
    mode: str


class ExpertRecordWriter:
    """Converts the expert tensors it is shown into records, resuming from the journal."""

    def __init__(self, output: Path, layers: List[ExpertLayer],
                 source_quant: Dict[Tuple[int, str], SourceQuantization], dtype: Optional[str], journal: Journal,
                 progress, owned: Optional[Dict[int, np.ndarray]] = None):
        """``source_quant``: the MLX quantization of each (layer, projection) of a quantized source, else {};
        ``owned``: per layer, the experts to write (``prepare --rank``: one rank's share; the files keep
        every record's place, the others stay holes), None for all."""
        self.layers = {layer.layer: layer for layer in layers}
        self.owned = owned
        self.source_quant, self.dtype = source_quant, dtype
        self.journal, self.progress = journal, progress
        self.fds: Dict[int, int] = {}
        for layer in layers:
            path = output / layer.file
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never through a link
            if os.fstat(fd).st_size != layer.file_size:
                os.ftruncate(fd, layer.file_size)
            self.fds[layer.layer] = fd
        self._unwritten = 0
        self._source_fds: Dict[Path, int] = {}
        self._row_cache: Tuple[Optional[Tuple[str, int]], Optional[np.ndarray]] = (None, None)

    # -- units -------------------------------------------------------------------------------
    def repacks(self, layer: int, proj: str) -> bool:
        """True when the source already holds this projection in the target quantization: copy its bytes."""
        sq, q = self.source_quant.get((layer, proj)), self.layers[layer].quantization
        return sq is not None and (sq.bits, sq.group_size, sq.mode) == (q.bits, q.group_size, q.mode)

    def unit_names(self, layer: int, expert: int) -> List[str]:
        names = []
        for proj in PROJECTIONS:
            if self.repacks(layer, proj):
                names += [p.name for p in self.layers[layer].layout.projection_parts(proj)]
            else:
                names.append(proj)
        return [f"{layer}/{expert}/{name}" for name in names]

    def wanted(self, layer: int, expert: int) -> bool:
        """Is this record written here (every record, or this rank's with ``owned``)?"""
        return self.owned is None or bool(self.owned[layer][expert])

    def all_units(self) -> Iterable[str]:
        for layer in self.layers.values():
            for e in range(layer.num_experts):
                if self.wanted(layer.layer, e):
                    yield from self.unit_names(layer.layer, e)

    def unit_bytes(self, unit: str) -> int:
        layer, _, name = unit.split("/")
        layout = self.layers[int(layer)].layout
        return sum(p.nbytes for p in layout.parts if p.name == name or p.name.startswith(name + "."))

    def mark_intact(self, checksums: Dict[str, str]) -> None:
        """Journal the records of ``checksums`` ("layer/expert" -> crc, verified intact) as done (repair)."""
        units = []
        for key in checksums:
            layer, e = map(int, key.split("/"))
            units += self.unit_names(layer, e)
        self.journal.add({"units": units, "checksums": dict(checksums)})
        self.commit()

    def remaining_units(self) -> List[str]:
        return [u for u in self.all_units() if u not in self.journal.done_units]

    # -- conversion --------------------------------------------------------------------------
    def convert(self, tensors: Dict[str, TensorInfo]) -> None:
        """Write every not-yet-written unit whose source tensors are all in ``tensors``."""
        index = {}
        for key, info in tensors.items():
            k = classify(key)
            if k is not None and k.layer in self.layers:
                index[(k.layer, k.expert, k.projection, k.part)] = info
        for layer in self.layers.values():
            for e in range(layer.num_experts):
                if not self.wanted(layer.layer, e):
                    continue
                wrote = False
                for unit in self.unit_names(layer.layer, e):
                    if unit in self.journal.done_units:
                        continue
                    parts = self._produce(unit, index)
                    if parts is None:
                        continue
                    self._write(layer, e, parts)
                    self.journal.add({"units": [unit]})
                    faults.point("unit")
                    wrote = True
                if wrote:
                    self._checksum_if_complete(layer, e)
                if self._unwritten >= COMMIT_EVERY_BYTES:
                    self.commit()
            self.commit()

    def _produce(self, unit: str, index) -> Optional[Dict[str, np.ndarray]]:
        layer_s, expert_s, name = unit.split("/")
        layer, e = int(layer_s), int(expert_s)
        if "." in name:  # repacked part
            proj, part = name.split(".")
            info = index.get((layer, None, proj, part))
            return None if info is None else {name: self._rows(info, e)}
        proj = name
        w = self._source_weight(index, layer, e, proj)
        if w is None:
            return None
        arrays = quantize(w, self.layers[layer].quantization, self.dtype)
        names = [p.name for p in self.layers[layer].layout.projection_parts(proj)]
        return dict(zip(names, arrays))

    def _source_weight(self, index, layer: int, e: int, proj: str):
        """One expert's float weight matrix for ``proj`` from whichever layout the source uses."""
        import mlx.core as mx

        sq = self.source_quant.get((layer, proj))
        if sq is not None:
            infos = [index.get((layer, None, proj, part)) for part in ("weight", "scales", "biases")]
            if infos[0] is None or infos[1] is None or (sq.mode == "affine" and infos[2] is None):
                return None
            arrays = [to_mx(self._rows(i, e), i.mlx_dtype) if i is not None else None for i in infos]
            return mx.dequantize(*arrays, group_size=sq.group_size, bits=sq.bits, mode=sq.mode)
        if (info := index.get((layer, e, proj, "weight"))) is not None:
            return to_mx(read_tensor(info, self._fd(info.file)), info.mlx_dtype)
        if (info := index.get((layer, None, proj, "weight"))) is not None:
            return to_mx(self._rows(info, e), info.mlx_dtype)
        if proj in ("gate_proj", "up_proj") and (info := index.get((layer, None, "gate_up_proj", "weight"))):
            rows = self._rows(info, e)
            half = rows.shape[0] // 2
            return to_mx(rows[:half] if proj == "gate_proj" else rows[half:], info.mlx_dtype)
        return None

    def _rows(self, info: TensorInfo, e: int) -> np.ndarray:
        key = (f"{info.file}:{info.key}", e)
        if self._row_cache[0] != key:
            self._row_cache = (key, read_rows(info, e, self._fd(info.file)))
        return self._row_cache[1]

    def _fd(self, path: Path) -> int:
        if path not in self._source_fds:
            self._source_fds[path] = os.open(path, os.O_RDONLY)
        return self._source_fds[path]

    def _write(self, layer: ExpertLayer, e: int, parts: Dict[str, np.ndarray]) -> None:
        base = e * layer.layout.record_size
        for name, data in parts.items():
            part = layer.layout.part(name)
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            if data.nbytes != part.nbytes:
                raise FlashMoeError(
                    f"layer {layer.layer} expert {e} {name}: source has {data.nbytes} bytes, expected "
                    f"{part.nbytes}; the checkpoint's shapes do not match its config"
                )
            try:
                view, offset = memoryview(data), base + part.offset
                while view.nbytes:
                    n = os.pwrite(self.fds[layer.layer], view, offset)
                    view, offset = view[n:], offset + n
            except OSError as err:
                raise disk_error(err, layer.file)
            self._unwritten += data.nbytes
            self.progress.update(data.nbytes)

    def checksum_complete_records(self) -> None:
        """Checksum complete records whose checksum a crash kept out of the journal."""
        for layer in self.layers.values():
            for e in range(layer.num_experts):
                if self.wanted(layer.layer, e) and f"{layer.layer}/{e}" not in self.journal.checksums:
                    self._checksum_if_complete(layer, e)
        self.commit()

    def _checksum_if_complete(self, layer: ExpertLayer, e: int) -> None:
        if all(u in self.journal.done_units for u in self.unit_names(layer.layer, e)):
            size = layer.layout.record_size
            record = os.pread(self.fds[layer.layer], size, e * size)
            self.journal.add({"checksums": {f"{layer.layer}/{e}": record_checksum(record)}})

    def commit(self) -> None:
        self.journal.commit(self.fds.values())
        self._unwritten = 0

    def close_sources(self) -> None:
        for fd in self._source_fds.values():
            os.close(fd)
        self._source_fds.clear()
        self._row_cache = (None, None)

    def close(self) -> None:
        self.close_sources()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class DiskFullError(FlashMoeError):
    """The disk filled up while writing ``file``; ``prepare`` adds how much space is still needed."""

    def __init__(self, file: str):
        super().__init__(f"the disk filled up while writing {file}")
        self.file = file


def disk_error(err: OSError, file: str) -> FlashMoeError:
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(file)
    return FlashMoeError(f"cannot write {file}: {err.strerror}")

