"""The flash layout: the on-disk format of a prepared model. The converter writes it, the engine reads it.

A prepared model is a directory:

    manifest.json              written last and atomically; its presence means "complete"
    .partial/                  while `prepare` works (or after it stopped): its journal, to resume from
    config.json, tokenizer...  copied from the source; config.json carries the resident quantization
                               (at least one of TOKENIZER_VOCAB_FILES)
    model.safetensors          resident (non-expert) weights, loadable by mlx-lm's model class
    vision.safetensors         the vision encoder's tensors as the source has them, if it has one (mlx-vlm loads it)
    experts/layer-NNN.bin      one file per MoE layer: num_experts fixed-size records

A record holds one expert: gate_proj, up_proj and down_proj, each as MLX-quantized weight, scales and
biases, stored back to back (64-byte aligned) so that one read brings the whole expert. Every record's
size is a multiple of 16 KiB and record e of a layer starts at e * record_size.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import FlashMoeError, one_line

FORMAT_VERSION = 2  # 2: the manifest carries `files` (checksums of config.json and the tokenizer files)
READABLE_VERSIONS = (1, 2)  # version 1 models load as they are; `verify` says its metadata has no checksums
MANIFEST_NAME = "manifest.json"
# The file `prepare` writes into an output before anything else: a directory is ours (`remove` may delete
# what the layout names in it) only when it holds this file, never because a manifest.json is there.
OWNER_MARKER = ".flash-moe-model"
OWNER_MARKER_TEXT = "written by `llm flash-moe prepare`: this directory holds a prepared model\n"
PARTIAL_DIR = ".partial"
EXPERTS_DIR = "experts"
RESIDENT_WEIGHTS_NAME, VISION_WEIGHTS_NAME = "model.safetensors", "vision.safetensors"  # mlx-lm loads model*
# Sane bounds on what a manifest or a source config may claim, checked before anything is allocated from it.
MAX_LAYERS = 1024
MAX_EXPERTS = 16384
MAX_DIMENSION = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
RECORD_ALIGNMENT = 16 * 1024
PART_ALIGNMENT = 64
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# A prepared model needs at least one of these for its tokenizer (copied from the source by prepare).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken")
# A damaged manifest does not say which command made it (a bare `prepare` would download the flagship).
DAMAGED_REMEDY = ("run the `llm flash-moe prepare` command that made this model again (`llm flash-moe prepare --demo` "
                  "for the demo): it starts over; or delete it with `llm flash-moe remove NAME`")

_DTYPE_BYTES = {"uint32": 4, "uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).exists() for f in TOKENIZER_VOCAB_FILES)


def check_experts_per_token(k, num_experts: int, option: str = "experts per token", model: str = "") -> int:
    """The one bound on experts per token, 1 to the experts per layer; ``option`` names what the user gave."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        target = f" for {model}" if model else ""
        raise FlashMoeError(f"{option} must be between 1 and {num_experts}{target}, not {k}")
    return k


def expert_file_name(layer: int) -> str:
    return f"{EXPERTS_DIR}/layer-{layer:03d}.bin"


def record_checksum(record: bytes) -> str:
    """The checksum stored in the manifest for one record (CRC-32 of all its bytes, padding included)."""
    return f"{zlib.crc32(record) & 0xFFFFFFFF:08x}"


def file_checksum(path, on_chunk=None, chunk: int = 16 << 20) -> str:
    """The checksum stored in the manifest for a whole file (CRC-32), read a chunk at a time;
    ``on_chunk(nbytes)`` is called after each chunk (progress)."""
    crc = 0
    buf = memoryview(bytearray(chunk))
    with open(path, "rb") as f:
        while got := f.readinto(buf):
            crc = zlib.crc32(buf[:got], crc)
            if on_chunk is not None:
                on_chunk(got)
    return f"{crc & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class ExpertQuantization:
    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"


EXPERT_BITS = (2, 3, 4, 8)  # what `prepare` offers: expert bits, group sizes, resident bits
GROUP_SIZES = (32, 64, 128)
RESIDENT_BITS = (4, 8, 16)
BITS_RULE_HELP = ("BITS, or BITS followed by ,LAYERS=BITS overrides: LAYERS is a layer number (negative counts "
                  "from the last: -1 is the last), a range A..B (inclusive), first or last; later overrides win. "
                  "E.g. 3,first=4,last=4 or 4,10..49=3")


@dataclass(frozen=True)
class BitsRule:
    """Expert bits per MoE layer: ``default`` everywhere except the ``overrides`` (first, last, bits).

    Written ``3`` (every layer) or ``3,0=4,-1=4`` / ``3,first=4,last=4`` (4 bits for the first and the last
    layer, 3 elsewhere) or ``4,10..49=3``. Layer numbers are the decoder layer numbers of the manifest and
    ``info``; negative ones count from the last layer. A prepared model records the resolved bits of every
    layer in its manifest; ``canonical_bits`` writes them back as the shortest rule of this syntax.
    """

    default: int
    overrides: Tuple[Tuple[int, int, int], ...] = ()

    @classmethod
    def parse(cls, text) -> "BitsRule":
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(_check_bits(text))
        items = [item.strip() for item in str(text).split(",")]
        try:
            default = _check_bits(int(items[0]))
        except ValueError:
            raise FlashMoeError(f"--bits {text!r} is not a bit width or rule; write {BITS_RULE_HELP}") from None
        overrides = []
        for item in items[1:]:
            layers, sep, bits = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                first, dots, last = layers.strip().partition("..")
                first = _layer_number(first)
                overrides.append((first, _layer_number(last) if dots else first, _check_bits(int(bits))))
            except ValueError:
                raise FlashMoeError(f"--bits: cannot read {item!r} in {text!r}; write {BITS_RULE_HELP}") from None
        return cls(default, tuple(overrides))

    def resolve(self, layers: Sequence[int]) -> Dict[int, int]:
        """Bits of each of ``layers`` (the model's MoE layer numbers). Names no layer the model lacks."""
        layers = sorted(layers)
        count = layers[-1] + 1 if layers else 0
        bits = {layer: self.default for layer in layers}
        for given_first, given_last, b in self.overrides:
            first, last = (n + count if n < 0 else n for n in (given_first, given_last))
            span = [layer for layer in layers if first <= layer <= last]
            if first < 0 or last >= count or first > last or not span:
                name = (f"layer {given_first}" if given_first == given_last
                        else f"layers {given_first}..{given_last}")
                raise FlashMoeError(f"--bits: {name} names no layer with experts; this model's expert layers "
                                    f"are {_ranges(layers)}")
            for layer in span:
                bits[layer] = b
        return bits


def _check_bits(bits: int) -> int:
    if bits not in EXPERT_BITS:
        raise FlashMoeError(f"--bits must be one of {', '.join(map(str, EXPERT_BITS))}, not {bits}")
    return bits


def _layer_number(text: str) -> int:
    text = text.strip().lower()
    return {"first": 0, "last": -1}.get(text) if text in ("first", "last") else int(text)


def _ranges(layers: Sequence[int]) -> str:
    runs, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            runs.append(f"{start}" if start == layer else f"{start}..{layer}")
            start = None
    return ", ".join(runs)


def canonical_bits(bits_by_layer: Dict[int, int]):
    """The bits of every layer as the shortest rule: an int when all are equal, else e.g. "3,0=4,59=4".

    The most common width is the default; each run of consecutive layers with another width is one
    override, with absolute layer numbers. ``BitsRule.parse(canonical_bits(b)).resolve(b) == b``.
    """
    values = sorted(set(bits_by_layer.values()))
    if len(values) <= 1:
        return values[0] if values else None
    counts = {b: list(bits_by_layer.values()).count(b) for b in values}
    default = max(values, key=lambda b: (counts[b], b))
    layers = sorted(bits_by_layer)
    items, i = [str(default)], 0
    while i < len(layers):
        b = bits_by_layer[layers[i]]
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1 and bits_by_layer[layers[j + 1]] == b:
            j += 1
        if b != default:
            items.append(f"{layers[i]}={b}" if i == j else f"{layers[i]}..{layers[j]}={b}")
        i = j + 1
    return ",".join(items)


@dataclass(frozen=True)
class RecordPart:
    """One array inside an expert record, e.g. ``up_proj.scales``."""

    name: str
    offset: int
    shape: Tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class RecordLayout:
    """Where each array of an expert lives inside its record."""

    parts: Tuple[RecordPart, ...]
    record_size: int

    @classmethod
    def for_expert(
        cls, hidden_size: int, intermediate_size: int, quant: ExpertQuantization, scale_dtype: str
    ) -> "RecordLayout":
        shapes = {"gate_proj": (intermediate_size, hidden_size),
                  "up_proj": (intermediate_size, hidden_size),
                  "down_proj": (hidden_size, intermediate_size)}
        parts, offset = [], 0
        for proj in PROJECTIONS:
            out_dims, in_dims = shapes[proj]
            if (in_dims * quant.bits) % 32 or in_dims % quant.group_size:
                raise FlashMoeError(
                    f"{proj} input size {in_dims} cannot be quantized at {quant.bits} bits with group size "
                    f"{quant.group_size}; choose another --group-size"
                )
            arrays = [("weight", (out_dims, in_dims * quant.bits // 32), "uint32"),
                      ("scales", (out_dims, in_dims // quant.group_size), scale_dtype)]
            if quant.has_biases:
                arrays.append(("biases", (out_dims, in_dims // quant.group_size), scale_dtype))
            for kind, shape, dtype in arrays:
                part = RecordPart(f"{proj}.{kind}", offset, shape, dtype)
                parts.append(part)
                offset = _round_up(offset + part.nbytes, PART_ALIGNMENT)
        return cls(tuple(parts), _round_up(offset, RECORD_ALIGNMENT))

    @property
    def parts_bytes(self) -> int:
        """Bytes of the arrays themselves (the record without its alignment padding)."""
        return sum(p.nbytes for p in self.parts)

    def part(self, name: str) -> RecordPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def projection_parts(self, proj: str) -> List[RecordPart]:
        return [p for p in self.parts if p.name.startswith(proj + ".")]

    def to_json(self) -> dict:
        return {"record_size": self.record_size,
                "parts": [{"name": p.name, "offset": p.offset, "shape": list(p.shape), "dtype": p.dtype}
                          for p in self.parts]}

    @classmethod
    def from_json(cls, d: dict) -> "RecordLayout":
        parts = tuple(RecordPart(p["name"], p["offset"], tuple(p["shape"]), p["dtype"]) for p in d["parts"])
        return cls(parts, d["record_size"])


@dataclass
class ExpertLayer:
    """One MoE layer's expert file."""

    layer: int
    file: str
    num_experts: int
    quantization: ExpertQuantization
    layout: RecordLayout
    checksums: List[str] = field(default_factory=list)

    @property
    def file_size(self) -> int:
        return self.num_experts * self.layout.record_size

    def problem(self, hidden_size: int, intermediate_size: int) -> Optional[str]:
        """What is inconsistent in this layer's entry (None: nothing): its file, counts, quantization, and
        a record layout other than the one the converter writes for these sizes (offsets, shapes, dtypes)."""
        if not _count(self.layer + 1 if isinstance(self.layer, int) else None, MAX_LAYERS):
            return f"layer number {self.layer!r} is out of range"
        if self.file != expert_file_name(self.layer):
            return f"its file is {self.file!r}, not {expert_file_name(self.layer)}"
        if not _count(self.num_experts, MAX_EXPERTS):
            return f"{self.num_experts!r} experts is not 1 to {MAX_EXPERTS}"
        q = self.quantization
        if q.bits not in EXPERT_BITS or q.group_size not in GROUP_SIZES or q.mode != "affine":
            return f"quantization {q} is not one the converter writes"
        scales = [p for p in self.layout.parts if p.name.endswith(".scales")]
        if not scales or scales[0].dtype not in _DTYPE_BYTES:
            return "its record layout has no scales"
        try:
            expected = RecordLayout.for_expert(hidden_size, intermediate_size, q, scales[0].dtype)
        except FlashMoeError as e:
            return str(e)
        if self.layout != expected:
            return "its record layout (offsets, shapes or dtypes of the parts) is not the converter's"
        if (not isinstance(self.checksums, list) or len(self.checksums) != self.num_experts
                or not all(c == "" or (isinstance(c, str) and _CHECKSUM.fullmatch(c)) for c in self.checksums)):
            return f"its checksums are not {self.num_experts} CRC-32 values"
        return None

    def to_json(self) -> dict:
        return {"layer": self.layer, "file": self.file, "num_experts": self.num_experts,
                "quantization": asdict(self.quantization), "layout": self.layout.to_json(),
                "checksums": self.checksums}

    @classmethod
    def from_json(cls, d: dict) -> "ExpertLayer":
        return cls(d["layer"], d["file"], d["num_experts"], ExpertQuantization(**d["quantization"]),
                   RecordLayout.from_json(d["layout"]), list(d.get("checksums", [])))


def _count(value, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


_CHECKSUM = re.compile(r"[0-9a-f]{8}")


def _file_entry_problem(entry) -> Optional[str]:
    """What is wrong with one {"file", "bytes", "checksum"} entry: a plain name in the model's directory."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return "a file entry has no file name"
    name = entry["file"]
    if not name or name.startswith((".", "/")) or "/" in name or "\\" in name:
        return f"file entry {name!r} is not a plain file name"
    size = entry.get("bytes")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 44:
        return f"{name} has an impossible size {size!r}"
    if not isinstance(entry.get("checksum"), str) or not _CHECKSUM.fullmatch(entry["checksum"]):
        return f"{name} has no valid checksum"
    return None


@dataclass
class Manifest:
    name: str
    source: str
    revision: Optional[str]
    model_type: str
    config: dict
    experts_per_token: int
    expert_layers: List[ExpertLayer]
    resident_quantization: Optional[dict]
    resident_files: List[dict]
    format_version: int = FORMAT_VERSION
    settings: dict = field(default_factory=dict)
    vision: Optional[dict] = None  # {"file": VISION_WEIGHTS_NAME, "tensors": N}, the file also in resident_files
    # config.json, the tokenizer files and the chat template: [{"file", "bytes", "checksum"}] (version 2 on)
    files: List[dict] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.expert_layers[0].num_experts if self.expert_layers else 0

    @property
    def expert_bytes(self) -> int:
        return sum(layer.file_size for layer in self.expert_layers)

    @property
    def resident_bytes(self) -> int:
        return sum(f["bytes"] for f in self.resident_files)

    @property
    def bits(self) -> str:
        bits = sorted({layer.quantization.bits for layer in self.expert_layers})
        return "/".join(str(b) for b in bits)

    def layer(self, index: int) -> ExpertLayer:
        for layer in self.expert_layers:
            if layer.layer == index:
                return layer
        raise KeyError(index)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "expert_layers"}
        d["expert_layers"] = [layer.to_json() for layer in self.expert_layers]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["expert_layers"] = [ExpertLayer.from_json(x) for x in d["expert_layers"]]
        return cls(**d)

    def write(self, model_dir: Path) -> None:
        write_json_atomic(Path(model_dir) / MANIFEST_NAME, self.to_json())

    @classmethod
    def load(cls, model_dir: Path) -> "Manifest":
        path = Path(model_dir) / MANIFEST_NAME
        try:
            data = json.loads(read_small(path, MAX_MANIFEST_BYTES))
        except RecursionError:
            raise FlashMoeError(f"{path} is damaged (nested too deeply); {DAMAGED_REMEDY}") from None
        except FileNotFoundError:
            raise FlashMoeError(f"{model_dir} is not a prepared model: it has no {MANIFEST_NAME} (a `llm flash-moe "
                                "prepare` into it never finished); see `llm flash-moe models`")
        except (ValueError, UnicodeDecodeError) as e:
            why = f" ({e})" if isinstance(e, TooLarge) else ""
            raise FlashMoeError(f"{path} is damaged{why}; {DAMAGED_REMEDY}")
        if not isinstance(data, dict):
            raise FlashMoeError(f"{path} is damaged (not a JSON object); {DAMAGED_REMEDY}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise FlashMoeError(f"{path} is damaged (no format_version); {DAMAGED_REMEDY}")
        if version > FORMAT_VERSION:
            raise FlashMoeError(
                f"{path} uses flash layout version {version}, newer than this plugin understands "
                f"({FORMAT_VERSION}); upgrade with `llm install -U llm-flash-moe`"
            )
        if version not in READABLE_VERSIONS:
            raise FlashMoeError(f"{path} is damaged (format_version {version}); {DAMAGED_REMEDY}")
        try:
            manifest = cls.from_json(data)
            problem = manifest.problem()
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            problem = f"{type(e).__name__}: {one_line(e, 120)}"
        if problem:
            raise FlashMoeError(f"{path} is damaged ({problem}); {DAMAGED_REMEDY}")
        return manifest

    def problem(self) -> Optional[str]:
        """What makes this manifest inconsistent (None when nothing does): every count, size, offset and
        file name checked against sane bounds and against the layout the converter writes for its config,
        before any of it is used to allocate or read."""
        for what, value in (("name", self.name), ("source", self.source), ("model_type", self.model_type)):
            if not isinstance(value, str):
                return f"{what} is not text"
        if not isinstance(self.config, dict) or not isinstance(self.settings, dict):
            return "config or settings is not an object"
        if not isinstance(self.expert_layers, list) or not 0 < len(self.expert_layers) <= MAX_LAYERS:
            return f"it lists {len(self.expert_layers)} expert layers, not 1 to {MAX_LAYERS}"
        text = self.config.get("text_config") or self.config
        hidden, intermediate = text.get("hidden_size"), text.get("moe_intermediate_size")
        if not all(_count(v, MAX_DIMENSION) for v in (hidden, intermediate)):
            return "config has no plausible hidden_size and moe_intermediate_size"
        files, numbers = set(), set()
        for layer in self.expert_layers:
            problem = layer.problem(hidden, intermediate)
            if problem:
                return f"layer {layer.layer}: {problem}"
            if layer.layer in numbers or layer.file in files:
                return f"layer {layer.layer} is listed twice or shares {layer.file} with another layer"
            numbers.add(layer.layer)
            files.add(layer.file)
        if len({layer.num_experts for layer in self.expert_layers}) != 1:
            return "its layers have different numbers of experts"
        if (isinstance(self.experts_per_token, bool) or not isinstance(self.experts_per_token, int)
                or not 1 <= self.experts_per_token <= self.num_experts):
            return f"experts_per_token {self.experts_per_token!r} is not between 1 and {self.num_experts}"
        if not isinstance(self.resident_files, list) or not self.resident_files:
            return "it lists no resident weights"
        for entry in [*self.resident_files, *self.files]:
            problem = _file_entry_problem(entry)
            if problem:
                return problem
        return None


class TooLarge(ValueError):
    """A small file (a manifest, a JSON file of ours) that is not a regular file or is larger than it can be."""


def read_small(path: Path, limit: int) -> bytes:
    """A file that must be small, read whole: at most ``limit`` bytes, and a regular file (a link to a device
    such as /dev/zero would never end). FileNotFoundError when it is missing."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise TooLarge("not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"larger than {limit >> 20} MB")
    return data


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def split_record(record, layout: RecordLayout) -> Dict[str, "numpy.ndarray"]:
    """Views of each part of one record's bytes (a numpy uint8 array), typed and shaped (bf16 as uint16)."""
    import numpy as np

    np_dtype = {"uint32": np.uint32, "bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
    out = {}
    for p in layout.parts:
        out[p.name] = record[p.offset:p.offset + p.nbytes].view(np_dtype[p.dtype]).reshape(p.shape)
    return out
