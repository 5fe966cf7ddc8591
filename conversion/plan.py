"""What `prepare` will do, decided before the first byte is written: the options, the plan (layers, record
layouts, the source's quantization, the settings a re-run must match) and whether it fits on the disk."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from .. import registry
from ..errors import FlashMoeError
from ..flash_layout import (
    FORMAT_VERSION, GROUP_SIZES, RESIDENT_BITS, BitsRule, ExpertLayer, ExpertQuantization, Manifest, RecordLayout,
    canonical_bits, check_experts_per_token, expert_file_name,
)
from ..engine.mlx_model import build_model
from .checkpoint import classify, conversion_dtype, is_vision, quantization_of
from .experts import SourceQuantization
from .journal import Journal
from .resident import estimate_resident_bytes
from .safetensors_io import DTYPES, read_header
from .source import Source, hub_errors


@dataclass
class PrepareOptions:
    source: str = registry.FLAGSHIP_SOURCE
    name: Optional[str] = None
    output: Optional[Path] = None
    # Expert bits: an int for every layer, or a per-layer rule such as "3,first=4,last=4" (flash_layout.BitsRule)
    bits: Union[int, str] = 4
    group_size: int = 64
    resident_bits: int = 4
    experts_per_token: Optional[int] = None
    delete_source: bool = False
    revision: Optional[str] = None
    # What the manifest (and the settings a re-run must match) call the source, instead of its path:
    # for a checkpoint written to a temporary directory (the demo), whose path means nothing later.
    source_label: Optional[str] = None
    # On a complete output with the same settings: verify it and rewrite only the damaged records
    # (and the resident weights, config and tokenizer), instead of saying "already prepared".
    repair: bool = False
    # Expert parallelism: write only the experts rank `rank` of `ranks` owns (cluster/ownership.py: round-robin, or
    # balanced by the counts in `popularity`); the other records stay holes in the files.
    rank: Optional[int] = None
    ranks: int = 1
    popularity: Optional[Path] = None


@dataclass
class Plan:
    """Everything decided before the first byte is written."""

    name: str
    output: Path
    source: Source
    layers: list
    experts_per_token: int
    source_quant: Dict[Tuple[int, str], SourceQuantization]  # (layer, projection) -> source's quantization
    dtype: Optional[str]
    tensor_meta: Dict[str, Tuple[str, tuple]]  # key -> (mlx dtype, shape), every source tensor
    settings: dict
    source_label: str  # manifest.source
    owned: Optional[dict] = None  # prepare --rank: per layer, the experts written here

    @cached_property
    def resident_estimate(self) -> int:
        """Bytes of the resident weights, from shapes (built on first use: an already prepared model
        never needs it)."""
        import numpy as np

        item = {name: np.dtype(np_type).itemsize for np_type, name in DTYPES.values()}
        vision = sum(int(np.prod(shape)) * item.get(dtype, 4) for k, (dtype, shape) in self.tensor_meta.items()
                     if is_vision(k))  # the vision encoder, kept as the source has it
        return estimate_resident_bytes(self.source.config, self.settings["resident_bits"]) + vision


def name_and_output(opts: PrepareOptions) -> Tuple[str, Path]:
    """The prepared model's name (checked) and the directory it goes to."""
    name = registry.check_name(opts.name or registry.name_from_source(opts.source))
    return name, Path(opts.output).expanduser().resolve() if opts.output else registry.default_output(name)


def check_options(opts: PrepareOptions) -> None:
    BitsRule.parse(opts.bits)  # one line saying what is wrong with it
    if opts.group_size not in GROUP_SIZES:
        raise FlashMoeError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {opts.group_size}")
    if opts.resident_bits not in RESIDENT_BITS:
        raise FlashMoeError(f"--resident-bits must be one of 4, 8, 16, not {opts.resident_bits}")
    if opts.ranks < 1 or (opts.ranks > 1) != (opts.rank is not None) or not 0 <= (opts.rank or 0) < opts.ranks:
        raise FlashMoeError(f"--rank R --ranks N go together, with 0 <= R < N (N >= 2), not --rank {opts.rank} "
                            f"--ranks {opts.ranks}")
    if opts.popularity is not None and opts.ranks < 2:
        raise FlashMoeError("--popularity balances the experts across ranks: give --rank R --ranks N too")


# The options a prepared model's settings record, as `prepare` spells them.
SETTING_OPTIONS = {"bits": "--bits", "group_size": "--group-size", "resident_bits": "--resident-bits",
                   "experts_per_token": "--experts-per-token"}


def same_model(old: dict, new: dict) -> bool:
    """Whether a prepared model's settings are those asked for (a model of an older readable format version is
    the same model: `--repair` rewrites its manifest in the current version)."""
    drop = ("format_version",)
    return {k: v for k, v in old.items() if k not in drop} == {k: v for k, v in new.items() if k not in drop}


def other_model_message(existing: Manifest, settings: dict, output: Path) -> str:
    """Why the complete model in ``output`` is not the one asked for (``settings``), naming the options that
    differ."""
    old = existing.settings
    changed = [k for k in SETTING_OPTIONS if old.get(k) != settings.get(k)]
    options = ", ".join(f"{SETTING_OPTIONS[k]} {old.get(k)}" for k in changed)
    asked = ", ".join(f"{SETTING_OPTIONS[k]} {settings.get(k)}" for k in changed)
    prepared_with = f", prepared with {options}, not {asked}" if changed else ""
    return (f"{output} already holds a different model ({existing.name} from {existing.source}{prepared_with}); "
            f"choose another --output or remove it with `llm flash-moe remove {existing.name}`")


def _tensor_meta(source: Source) -> Dict[str, Tuple[str, tuple]]:
    """Dtype and shape of every source tensor, from local headers or, for shards not yet downloaded, the hub."""
    meta: Dict[str, Tuple[str, tuple]] = {}
    remote = []
    for shard in source.shards:
        path = source.directory / shard
        if path.exists():
            meta.update({k: (i.mlx_dtype, i.shape) for k, i in read_header(path).items()})
        elif source.repo_id is None:
            raise FlashMoeError(f"shard {shard} is missing from {source.directory}")
        else:
            remote.append(shard)
    if remote:
        from huggingface_hub import HfApi

        with hub_errors(source.repo_id):
            info = HfApi().get_safetensors_metadata(source.repo_id, revision=source.revision)
        for shard in remote:
            for k, t in info.files_metadata[shard].tensors.items():
                meta[k] = (DTYPES[t.dtype][1], tuple(t.shape))
    return meta


def plan_settings(opts: PrepareOptions, name: str, label: str, revision: Optional[str], bits_by_layer: Dict[int, int],
                  experts_per_token: int) -> dict:
    """What a prepared model records of how it was made; a re-run with other settings is another model."""
    return {"format_version": FORMAT_VERSION, "name": name, "source": label, "revision": revision,
            "bits": canonical_bits(bits_by_layer), "group_size": opts.group_size, "resident_bits": opts.resident_bits,
            "experts_per_token": experts_per_token}


def make_plan(opts: PrepareOptions, name: str, output: Path, source: Source) -> Plan:
    config = source.config
    tensor_meta = _tensor_meta(source)
    shapes = {}

    def record_shape(index, block):
        import mlx.nn as nn

        shapes[index] = (block.num_experts, *block.switch_mlp.gate_proj.weight.shape[1:], block.top_k)
        return nn.Module()

    build_model(config, record_shape)
    if not shapes:
        raise FlashMoeError(f"{source.id} has no routed experts to stream")
    source_q = quantization_of(config)
    bits = BitsRule.parse(opts.bits).resolve(list(shapes))
    sq = {}
    if source_q is not None:
        scales = [m for k, m in tensor_meta.items() if (c := classify(k)) and c.part == "scales"]
        scale_dtype = scales[0][0] if scales else "bfloat16"
        for key in tensor_meta:
            c = classify(key)
            if c is not None and c.part == "weight":
                q = source_q.get(key[: -len(".weight")])
                q = q if isinstance(q, dict) else source_q
                sq[(c.layer, c.projection)] = SourceQuantization(q["bits"], q["group_size"], q.get("mode", "affine"))
    else:
        weights = [m for k, m in tensor_meta.items() if classify(k)]
        if not weights:
            raise FlashMoeError(f"{source.id} has no expert tensors; is a shard missing?")
        scale_dtype = conversion_dtype(config) or weights[0][0]
    layers = []
    for index, (num_experts, intermediate, hidden, _) in sorted(shapes.items()):
        quant = ExpertQuantization(bits[index], opts.group_size)
        layout = RecordLayout.for_expert(hidden, intermediate, quant, scale_dtype)
        layers.append(ExpertLayer(index, expert_file_name(index), num_experts, quant, layout))
    native_k = next(iter(shapes.values()))[3]
    k = opts.experts_per_token or (registry.FLAGSHIP_EXPERTS_PER_TOKEN
                                   if opts.source == registry.FLAGSHIP_SOURCE else native_k)
    check_experts_per_token(k, layers[0].num_experts, "--experts-per-token")
    label = opts.source_label or source.id
    settings = plan_settings(opts, name, label, source.revision, bits, k)
    owned = None
    if opts.ranks > 1:
        from ..cluster.ownership import Ownership, read_counts

        experts = {layer.layer: layer.num_experts for layer in layers}
        ownership = (Ownership.round_robin(experts, opts.ranks) if opts.popularity is None else
                     Ownership.balanced(experts, opts.ranks, read_counts(opts.popularity)))
        settings["shard"] = {"rank": opts.rank, "ranks": opts.ranks, "kind": ownership.kind,
                             "ownership": ownership.digest(), "map": ownership.to_json()}
        owned = {layer: ownership.owned(layer, opts.rank) for layer in experts}
    return Plan(name, output, source, layers, k, sq, conversion_dtype(config), tensor_meta, settings, label, owned)


def _fmt(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _space_needed(plan: Plan, journal_done_shards=frozenset()) -> Tuple[int, int]:
    """(bytes still to be written in the output and downloaded beside it, bytes free there)."""
    output = plan.output
    written = 0
    for layer in plan.layers:
        path = output / layer.file
        if path.exists():
            written += min(path.stat().st_blocks * 512, layer.file_size)
    need = sum(layer.layout.record_size * (layer.num_experts if plan.owned is None else int(plan.owned[layer.layer].sum()))
               for layer in plan.layers) - written + plan.resident_estimate
    if plan.source.repo_id is not None:
        sizes = plan.source.shard_sizes
        pending = [s for s in plan.source.shards if s not in journal_done_shards]
        download = (max((sizes.get(s, 0) for s in pending), default=0) if plan.source.delete_shards
                    else plan.source.missing_bytes())
        if os.stat(_existing_parent(plan.source.directory)).st_dev == os.stat(_existing_parent(output)).st_dev:
            need += download
    return need, shutil.disk_usage(_existing_parent(output)).free


def space_needed_message(plan: Optional[Plan]) -> str:
    if plan is None:
        return "free some space"
    try:
        need, free = _space_needed(plan)
    except OSError:
        return f"{plan.name} needs more space in {plan.output}"
    return f"{plan.name} needs about {_fmt(need)} more in {plan.output} and {_fmt(free)} is free"


def check_disk_space(plan: Plan, journal: Journal) -> None:
    """Refuse up front, with the numbers, when the output (and any download) cannot fit."""
    need, free = _space_needed(plan, journal.done_shards)
    if need > free:
        raise FlashMoeError(
            f"not enough disk space for {plan.name}: it needs {_fmt(need)} more in {plan.output} but only "
            f"{_fmt(free)} is free; free some space or choose --output on another disk"
        )


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path
