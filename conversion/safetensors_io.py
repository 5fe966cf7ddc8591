"""Reading tensor byte ranges from safetensors files and writing safetensors one tensor at a time.

Both sides keep memory bounded: a reader fetches one slice with ``os.pread``; the writer lays out the
header from shapes alone and then writes each tensor's bytes as it is produced.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np

from ..errors import FlashMoeError

# safetensors dtype name -> (numpy storage dtype, mlx dtype name). bf16 is stored as uint16 in numpy.
DTYPES = {
    "BF16": (np.uint16, "bfloat16"),
    "F16": (np.float16, "float16"),
    "F32": (np.float32, "float32"),
    "U32": (np.uint32, "uint32"),
    "U8": (np.uint8, "uint8"),
    "I32": (np.int32, "int32"),
    "I64": (np.int64, "int64"),
    "BOOL": (np.bool_, "bool"),
}
MLX_TO_SAFETENSORS = {mlx: st for st, (_, mlx) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def mlx_dtype(self) -> str:
        return DTYPES[self.dtype][1]


MAX_TENSOR_DIMENSIONS = 8


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """Parse a safetensors header and check it before anything trusts it: every tensor's dtype, shape and
    offsets well-formed, its byte count that of its shape, its bytes inside the file, no two overlapping."""
    path = Path(path)
    try:
        if not path.is_file():
            raise FlashMoeError(f"{path} is not a regular file; give a checkpoint of safetensors files")
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FlashMoeError(f"{path} is truncated or not a safetensors file; download it again")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise FlashMoeError(f"{path} is truncated or not a safetensors file; download it again")
            header = json.loads(f.read(n))
    except RecursionError:
        raise FlashMoeError(f"{path} is not a valid safetensors file (its header is nested too deeply)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, FlashMoeError):
            raise
        raise FlashMoeError(f"cannot read {path} as safetensors ({e}); download it again")
    if not isinstance(header, dict):
        raise FlashMoeError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    base = 8 + n
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        problem = _tensor_problem(meta, size - base)
        if problem:
            if problem == "truncated":
                raise FlashMoeError(
                    f"{path} is truncated: {key} needs bytes up to {base + meta['data_offsets'][1]:,} but the file "
                    f"has {size:,}; download it again")
            raise FlashMoeError(f"{path} is not a valid safetensors file: tensor {key} {problem}")
        start, end = meta["data_offsets"]
        tensors[key] = TensorInfo(path, key, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
    ranges = sorted((i.start, i.end, k) for k, i in tensors.items() if i.end > i.start)
    for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
        if start < end:
            raise FlashMoeError(f"{path} is not a valid safetensors file: tensors {a} and {b} overlap")
    return tensors


def _tensor_problem(meta, data_bytes: int):
    """What is wrong with one tensor's header entry (None: nothing; "truncated": its bytes are past the end)."""
    if not isinstance(meta, dict):
        return "has no dtype, shape and data_offsets"
    if meta.get("dtype") not in DTYPES:
        return f"has unsupported dtype {str(meta.get('dtype'))[:20]}"
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    ints = (lambda xs, n=None: isinstance(xs, list) and (n is None or len(xs) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs))
    if not ints(shape) or len(shape) > MAX_TENSOR_DIMENSIONS:
        return "has no valid shape (a list of at most 8 sizes >= 0)"
    if not ints(offsets, 2) or offsets[0] > offsets[1]:
        return "has no valid data_offsets (two increasing offsets >= 0)"
    count = 1
    for d in shape:
        count *= d
    if count * np.dtype(DTYPES[meta["dtype"]][0]).itemsize != offsets[1] - offsets[0]:
        return f"has {offsets[1] - offsets[0]:,} bytes, not the {count:,} elements of its shape"
    if offsets[1] > data_bytes:
        return "truncated"
    return None


def read_rows(info: TensorInfo, index: int, fd: int) -> np.ndarray:
    """Read ``tensor[index]`` (a slice along the first axis, contiguous on disk) as a numpy array."""
    rows = info.shape[0]
    row_bytes = info.nbytes // rows
    buf = os.pread(fd, row_bytes, info.start + index * row_bytes)
    if len(buf) != row_bytes:
        raise FlashMoeError(f"{info.file} is truncated (reading {info.key}); download it again")
    return np.frombuffer(buf, dtype=DTYPES[info.dtype][0]).reshape(info.shape[1:])


def read_tensor(info: TensorInfo, fd: int) -> np.ndarray:
    buf = os.pread(fd, info.nbytes, info.start)
    if len(buf) != info.nbytes:
        raise FlashMoeError(f"{info.file} is truncated (reading {info.key}); download it again")
    return np.frombuffer(buf, dtype=DTYPES[info.dtype][0]).reshape(info.shape)


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are known by shape first and produced one at a time.

    ``tensors`` is a list of (key, mlx dtype name, shape). ``write(key, data)`` takes bytes-like data.
    The file is written under ``path + ".partial"`` and renamed by ``close()`` once every tensor is in.
    """

    def __init__(self, path: Path, tensors: List[Tuple[str, str, Tuple[int, ...]]], metadata=None):
        self.path = Path(path)
        header, offset, self._slots = {}, 0, {}
        if metadata:
            header["__metadata__"] = metadata
        for key, dtype, shape in tensors:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[MLX_TO_SAFETENSORS[dtype]][0]).itemsize
            header[key] = {"dtype": MLX_TO_SAFETENSORS[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            self._slots[key] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._base = 8 + len(raw)
        self.size = self._base + offset
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        self._pending = set(self._slots)

    def write(self, key: str, data, at: int = 0) -> None:
        """Write ``data`` at byte ``at`` of tensor ``key``; the tensor counts as written once its end is."""
        offset, nbytes = self._slots[key]
        view = memoryview(data).cast("B")
        if at + view.nbytes > nbytes or (at == 0 and view.nbytes == 0 and nbytes):
            raise ValueError(f"{key}: {view.nbytes} bytes at {at} do not fit its {nbytes} bytes")
        _pwrite_all(self._fd, view, self._base + offset + at)
        if at + view.nbytes == nbytes:
            self._pending.discard(key)

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"tensors never written: {sorted(self._pending)[:3]}")
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        os.close(self._fd)
        self._tmp.unlink(missing_ok=True)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_tensors(infos: Iterable[TensorInfo], dest: Path, chunk: int = 64 << 20) -> None:
    """Copy tensors byte for byte into a new safetensors file, a chunk at a time."""
    infos = list(infos)
    writer = SafetensorsWriter(dest, [(i.key, i.mlx_dtype, i.shape) for i in infos])
    try:
        for info in infos:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                offset = 0
                while offset < info.nbytes:
                    data = os.pread(fd, min(chunk, info.nbytes - offset), info.start + offset)
                    if not data:
                        raise FlashMoeError(f"{info.file} is truncated (reading {info.key}); download it again")
                    writer.write(info.key, data, at=offset)
                    offset += len(data)
            finally:
                os.close(fd)
        writer.close()
    except BaseException:
        writer.abort()
        raise
