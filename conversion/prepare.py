"""`llm flash-moe prepare`: checkpoint -> flash layout, resumable, in bounded memory and checked disk space."""

from __future__ import annotations

import errno
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

from .. import registry
from ..errors import FlashMoeError
from ..flash_layout import (
    EXPERT_BITS, FORMAT_VERSION, GROUP_SIZES, RESIDENT_BITS, MANIFEST_NAME, RESIDENT_WEIGHTS_NAME, BitsRule, ExpertLayer, ExpertQuantization,
    Manifest, RecordLayout, canonical_bits, expert_file_name,
)
from ..mlx_model import build_model
from .checkpoint import TOKENIZER_FILES, classify, conversion_dtype, quantization_of
from . import faults
from .experts import DiskFullError, ExpertRecordWriter, SourceQuantization
from .journal import PARTIAL_DIR, Journal
from .resident import estimate_resident_bytes, resident_parameters, write_resident
from .safetensors_io import DTYPES, TensorInfo, copy_tensors, read_header
from .source import Source, hub_errors, resolve_source
from ..ownership import read_counts



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
    # Expert parallelism: write only the experts rank `rank` of `ranks` owns (ownership.py: round-robin, or
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
        return estimate_resident_bytes(self.source.config, self.settings["resident_bits"])


def prepare(opts: PrepareOptions, echo: Callable[[str], None] = print) -> Manifest:
    """Convert (or resume converting, or repair) one model; registers it only once it is complete.

    Every failure is a FlashMoeError with one line saying what to do; the output keeps the work done
    so far (``.partial/``) and the same command continues it.
    """
    _check_options(opts)
    name = registry.check_name(opts.name or registry.name_from_source(opts.source))
    output = Path(opts.output).expanduser().resolve() if opts.output else registry.default_output(name)
    plan = None
    try:
        existing = _existing_output(output)
        source = resolve_source(opts.source, opts.revision, opts.delete_source)
        plan = _plan(opts, name, output, source)
        damaged_manifest = existing is DAMAGED
        if damaged_manifest:
            existing = None
        if existing is not None:
            if existing.settings != plan.settings:
                raise FlashMoeError(
                    f"{output} already holds a different model ({existing.name} from {existing.source}); "
                    f"choose another --output or remove it with `llm flash-moe remove {existing.name}`"
                )
            if not opts.repair:
                _remove_leftovers(output)
                registry.register(name, output)
                echo(f"{name} is already prepared in {output} (`llm flash-moe verify {name}` checks it)")
                return existing
        journal = Journal(output)
        journal.lock()
        try:
            if damaged_manifest:
                echo(f"{output / MANIFEST_NAME} is damaged and nothing in {output} can be trusted: "
                     "preparing it again from the start")
                journal.reset()
                (output / MANIFEST_NAME).unlink()
            intact = None
            if existing is not None:
                intact = _start_repair(existing, plan, echo)
                if intact is None:
                    registry.register(name, output)
                    return existing
            journal.check_plan(plan.settings)
            _check_disk_space(plan, journal)
            manifest = _convert(plan, journal, opts.resident_bits, echo, intact)
        finally:
            journal.unlock()
    except DiskFullError as e:
        raise FlashMoeError(f"{e}: {_space_needed_message(plan)}; free some space and run the same command "
                            "again to continue where it stopped") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FlashMoeError(f"the disk filled up ({e.filename or output}): {_space_needed_message(plan)}; "
                                "free some space and run the same command again to continue where it stopped"
                                ) from None
        raise FlashMoeError(f"cannot prepare {name} in {output}: {e.strerror or e} "
                            f"({e.filename or 'during the conversion'})") from None
    registry.register(name, output)
    return manifest


def _remove_leftovers(output: Path) -> None:
    """Remove the .partial/ of a run killed between writing the manifest and cleaning up (unless one runs)."""
    if not (output / PARTIAL_DIR).exists():
        return
    journal = Journal(output)
    try:
        journal.lock()
    except FlashMoeError:
        return  # a `prepare --repair` is at work on it
    try:
        shutil.rmtree(output / PARTIAL_DIR, ignore_errors=True)
    finally:
        journal.unlock()


def _start_repair(existing: Manifest, plan: Plan, echo) -> Optional[Dict[str, str]]:
    """Verify a complete model: None when it is intact, else the checksums of its intact records.

    The conversion that follows journals those records as done before it removes the manifest, so it
    rewrites only the damaged records (plus the resident weights and metadata), and resumes like any
    conversion when interrupted.
    """
    from ..verify import verify_model

    report = verify_model(plan.output, existing, progress=True)
    if report.ok:
        echo(f"{plan.name} is intact: nothing to repair")
        return None
    for line in report.lines():
        echo(line)
    n = len(report.bad_experts)
    echo(f"Repairing {plan.name}: rewriting {n} expert record{'s' * (n != 1)}, the resident weights and the metadata")
    return {f"{layer.layer}/{e}": crc for layer in existing.expert_layers for e, crc in enumerate(layer.checksums)
            if (layer.layer, e) not in report.bad_experts}


def _check_options(opts: PrepareOptions) -> None:
    BitsRule.parse(opts.bits)  # one line saying what is wrong with it
    if opts.ranks < 1 or (opts.ranks > 1) != (opts.rank is not None) or not 0 <= (opts.rank or 0) < opts.ranks:
        raise FlashMoeError(f"--rank R --ranks N go together, with 0 <= R < N (N >= 2), not --rank {opts.rank} "
                            f"--ranks {opts.ranks}")
    if opts.popularity is not None and opts.ranks < 2:
        raise FlashMoeError("--popularity balances the experts across ranks: give --rank R --ranks N too")
    if opts.group_size not in GROUP_SIZES:
        raise FlashMoeError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {opts.group_size}")
    if opts.resident_bits not in RESIDENT_BITS:
        raise FlashMoeError(f"--resident-bits must be one of 4, 8, 16, not {opts.resident_bits}")


DAMAGED = "damaged"  # _existing_output: a manifest that cannot be read (and is not from a newer version)


def _existing_output(output: Path):
    """The complete model in ``output`` (a Manifest), None, or DAMAGED (its manifest cannot be read)."""
    path = output / MANIFEST_NAME
    if path.exists():
        try:
            return Manifest.load(output)
        except FlashMoeError:
            try:
                version = json.loads(path.read_text()).get("format_version")
            except (OSError, ValueError, AttributeError, UnicodeDecodeError):
                version = None
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise
            return DAMAGED
    if output.exists() and any(output.iterdir()) and not (output / PARTIAL_DIR).exists():
        raise FlashMoeError(f"{output} is not empty and is not a flash-moe model; choose another --output")
    return None


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


def _plan(opts: PrepareOptions, name: str, output: Path, source: Source) -> Plan:
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
    num_experts = layers[0].num_experts
    native_k = next(iter(shapes.values()))[3]
    k = opts.experts_per_token or (registry.FLAGSHIP_EXPERTS_PER_TOKEN
                                   if opts.source == registry.FLAGSHIP_SOURCE else native_k)
    if not 1 <= k <= num_experts:
        raise FlashMoeError(f"--experts-per-token must be between 1 and {num_experts}, not {k}")
    label = opts.source_label or source.id
    settings = {"format_version": FORMAT_VERSION, "name": name, "source": label, "revision": source.revision,
                "bits": canonical_bits(bits), "group_size": opts.group_size, "resident_bits": opts.resident_bits,
                "experts_per_token": k}
    owned = None
    if opts.ranks > 1:
        from ..ownership import Ownership

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


def _space_needed_message(plan: Optional[Plan]) -> str:
    if plan is None:
        return "free some space"
    try:
        need, free = _space_needed(plan)
    except OSError:
        return f"{plan.name} needs more space in {plan.output}"
    return f"{plan.name} needs about {_fmt(need)} more in {plan.output} and {_fmt(free)} is free"


def _check_disk_space(plan: Plan, journal: Journal) -> None:
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


def _convert(plan: Plan, journal: Journal, resident_bits: int, echo,
             intact: Optional[Dict[str, str]] = None) -> Manifest:
    """``intact`` (repair): "layer/expert" -> checksum of the records that are right; only the others are written."""
    from huggingface_hub.utils import tqdm

    output, source = plan.output, plan.source
    writer = ExpertRecordWriter(output, plan.layers, plan.source_quant, plan.dtype, journal, progress=None,
                                owned=plan.owned)
    if intact is not None:
        writer.mark_intact(intact)
        (output / MANIFEST_NAME).unlink()  # from here on the model is incomplete until the new manifest
    done = sum(writer.unit_bytes(u) for u in journal.done_units)
    total = sum(writer.unit_bytes(u) for u in writer.all_units()) + plan.resident_estimate
    with tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=f"Preparing {plan.name}") as progress:
        writer.progress = progress
        try:
            available = _convert_shards(plan, journal, writer)
            missing = writer.remaining_units()
            if missing:
                layer, expert, what = missing[0].split("/")
                raise FlashMoeError(
                    f"the checkpoint lacks expert weights ({len(missing)} pieces, e.g. layer {layer} expert "
                    f"{expert} {what}); a shard is missing or incomplete"
                )
            writer.checksum_complete_records()
        finally:
            writer.close()
        non_expert = {k: i for k, i in available.items() if classify(k) is None}
        expert_meta = {k: m for k, m in plan.tensor_meta.items() if classify(k) is not None}
        params, out_config, note = resident_parameters(source.config, non_expert, expert_meta, resident_bits)
        progress.total = progress.n + sum(v.nbytes for v in params.values())
        size, checksum = write_resident(params, output / RESIDENT_WEIGHTS_NAME, progress)
    if note:
        echo(note)
    _write_metadata(source, out_config, output)
    _check_loads(output)
    for layer in plan.layers:
        layer.checksums = [journal.checksums[f"{layer.layer}/{e}"] if writer.wanted(layer.layer, e) else ""
                           for e in range(layer.num_experts)]  # "": a record another rank holds
    manifest = Manifest(
        name=plan.name, source=plan.source_label, revision=source.revision, model_type=source.config["model_type"],
        config=out_config, experts_per_token=plan.experts_per_token, expert_layers=plan.layers,
        resident_quantization=out_config.get("quantization"),
        resident_files=[{"file": RESIDENT_WEIGHTS_NAME, "bytes": size, "checksum": checksum}],
        settings=plan.settings,
    )
    faults.point("manifest")
    manifest.write(output)
    faults.point("finish")
    shutil.rmtree(output / PARTIAL_DIR, ignore_errors=True)
    return manifest


def _convert_shards(plan: Plan, journal: Journal, writer: ExpertRecordWriter) -> Dict[str, TensorInfo]:
    """Feed shards to the expert writer as they arrive; returns every tensor still readable afterwards."""
    source = plan.source
    available: Dict[str, TensorInfo] = {}
    staging = journal.dir
    for file in set(journal.staged.values()):
        available.update(read_header(staging / file))
    if source.repo_id is None:
        for shard in source.shards:
            available.update(read_header(source.fetch(shard)))
        writer.convert(available)
        return available
    pending = [s for s in source.shards if not (source.delete_shards and s in journal.done_shards)]
    for shard in journal.done_shards:
        source.release(shard)  # converted, but a crash came before it was deleted
    with ThreadPoolExecutor(max_workers=1) as downloader:  # the next shard downloads while this one converts
        futures = [downloader.submit(source.fetch, s) for s in pending[:1]]
        for i, shard in enumerate(pending):
            path = futures[i].result()
            if i + 1 < len(pending):
                futures.append(downloader.submit(source.fetch, pending[i + 1]))
            infos = read_header(path)
            available.update(infos)
            writer.convert(available)
            writer.close_sources()
            if source.delete_shards:
                keep = [info for k, info in infos.items() if classify(k) is None]
                stage_name = f"staged-{shard}"
                if keep:
                    copy_tensors(keep, staging / stage_name)
                    available.update(read_header(staging / stage_name))
                for k in infos:
                    if classify(k) is not None:
                        available.pop(k, None)
                journal.add({"shard": shard, "staged": {i.key: stage_name for i in keep}})
                writer.commit()
                source.release(shard)
    return available


def _write_metadata(source: Source, config: dict, output: Path) -> None:
    from mlx_lm.utils import save_config

    save_config(dict(config), output / "config.json")
    for name in TOKENIZER_FILES:
        src = source.directory / name
        if src.exists():
            shutil.copyfile(src, output / name)


def _check_loads(output: Path) -> None:
    """The resident weights must load into mlx-lm's model class with strict checking."""
    from ..engine import load_resident_model

    try:
        load_resident_model(output, lazy=True)
    except (ValueError, KeyError) as e:
        raise FlashMoeError(f"the converted resident weights do not load into mlx-lm: {str(e).splitlines()[0]}")
