"""`llm flash-moe prepare`: checkpoint -> flash layout, resumable, in bounded memory and checked disk space.

This module runs a conversion (and says what is left when one stops); ``plan`` decides what it will do."""

from __future__ import annotations

import errno
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Optional

from .. import registry
from ..errors import FlashMoeError, one_line
from ..flash_layout import (FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES, PARTIAL_DIR, RESIDENT_WEIGHTS_NAME,
                            VISION_WEIGHTS_NAME, Manifest, file_checksum, read_small)
from ..integrity import mark_ours, refuse_foreign
from . import faults
from .checkpoint import TOKENIZER_FILES, checked_file, classify, is_vision
from .experts import DiskFullError, ExpertRecordWriter
from .journal import Journal
from .plan import (PrepareOptions, Plan, check_disk_space, check_options, make_plan, name_and_output,
                   other_model_message, same_model, space_needed_message)
from .resident import resident_parameters, write_resident
from .safetensors_io import TensorInfo, copy_tensors, read_header
from .source import Source, resolve_source


def prepare(opts: PrepareOptions, echo: Callable[[str], None] = print) -> Manifest:
    """Convert (or resume converting, or repair) one model; registers it only once it is complete.

    Every failure is a FlashMoeError with one line saying what to do (Ctrl-C: an ``Interrupted``, still a
    KeyboardInterrupt, with such a line). Work done so far stays in the output (``.partial/``), the
    message says so, and the same command continues it; a run that fails before any of its work was
    journaled on a new output leaves nothing behind.
    """
    check_options(opts)
    name, output = name_and_output(opts)
    plan = None
    try:
        existing = _existing_output(output)
        source = resolve_source(opts.source, opts.revision, opts.delete_source)
        plan = make_plan(opts, name, output, source)
        manifest = _prepare(opts, plan, existing, echo)
    except (KeyboardInterrupt, OSError) as e:
        raise _explained(e, plan, name, output) from None
    registry.register(name, output)
    return manifest


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `prepare`, with the one line that says what is left and how to continue."""


def _prepare(opts: PrepareOptions, plan: Plan, existing, echo) -> Manifest:
    name, output = plan.name, plan.output
    damaged_manifest = existing is DAMAGED
    if damaged_manifest:
        existing = None
    if existing is not None:
        if not same_model(existing.settings, plan.settings):
            raise FlashMoeError(other_model_message(existing, plan.settings, output))
        if not opts.repair:
            _remove_leftovers(output)
            echo(f"{name} is already prepared in {output} (`llm flash-moe verify {name}` checks it)")
            return existing
    new_output = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    mark_ours(output)  # before anything else: what `remove` may delete is decided by this file, never by names
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
                return existing
        journal.check_plan(plan.settings)
        check_disk_space(plan, journal)
        return _convert(plan, journal, opts.resident_bits, echo, intact)
    except BaseException as e:
        if new_output and journal.is_empty():
            shutil.rmtree(output, ignore_errors=True)  # nothing a re-run could reuse, and no one else's
        raise _explained(e, plan, name, output) from None
    finally:
        journal.unlock()


def _explained(e: BaseException, plan: Optional[Plan], name: str, output: Path) -> BaseException:
    """The one-line FlashMoeError for an interruption or failure of `prepare` (other exceptions as they are):
    what went wrong, and what is left in the output."""
    if isinstance(e, KeyboardInterrupt):
        return e if isinstance(e, Interrupted) else Interrupted(f"interrupted; {_left_behind(name, output)}")
    if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        what = str(e) if isinstance(e, DiskFullError) else f"the disk filled up ({e.filename or output})"
        return FlashMoeError(f"{what}: {space_needed_message(plan)}; free some space and run the same command "
                             "again to continue where it stopped")
    if isinstance(e, OSError):
        e = FlashMoeError(f"cannot prepare {name} in {output}: {e.strerror or e} "
                          f"({e.filename or 'during the conversion'})")
    if isinstance(e, FlashMoeError) and (output / PARTIAL_DIR).exists() and "run the same command again" not in str(e):
        return FlashMoeError(f"{e}; {_left_behind(name, output)}")
    return e


def _left_behind(name: str, output: Path) -> str:
    """What an interrupted or failed run leaves in ``output``, and what the user can do with it."""
    if not (output / PARTIAL_DIR).exists():
        return f"nothing was left in {output}"
    discard = (f"`llm flash-moe remove {name}`" if output == registry.default_output(name)
               else f"deleting {output}")
    return (f"the work done so far is kept in {output}: run the same command again to continue where it "
            f"stopped ({discard} discards it)")


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
    for layer in existing.expert_layers:  # a damaged file that is a link is replaced, never written through
        path = plan.output / layer.file
        if path.is_symlink() and any(key[0] == layer.layer for key in report.bad_experts):
            path.unlink()
            report.bad_experts.update({(layer.layer, e): "a link" for e in range(layer.num_experts)})
    for line in report.lines():
        echo(line)
    n = len(report.bad_experts)
    echo(f"Repairing {plan.name}: rewriting {n} expert record{'s' * (n != 1)}, the resident weights and the metadata")
    return {f"{layer.layer}/{e}": crc for layer in existing.expert_layers for e, crc in enumerate(layer.checksums)
            if (layer.layer, e) not in report.bad_experts}


DAMAGED = "damaged"  # _existing_output: a manifest that cannot be read (and is not from a newer version)


def _existing_output(output: Path):
    """The complete model in ``output`` (a Manifest), None, or DAMAGED (its manifest cannot be read)."""
    path = output / MANIFEST_NAME
    refuse_foreign(output)
    if path.exists():
        try:
            return Manifest.load(output)
        except FlashMoeError:
            try:
                version = json.loads(read_small(path, MAX_MANIFEST_BYTES)).get("format_version")
            except (OSError, ValueError, AttributeError, UnicodeDecodeError, RecursionError):
                version = None
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise
            return DAMAGED
    return None


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
        non_expert = {k: i for k, i in available.items() if classify(k) is None and not is_vision(k)}
        vision = {k: i for k, i in available.items() if is_vision(k)}
        expert_meta = {k: m for k, m in plan.tensor_meta.items() if classify(k) is not None}
        params, out_config, note = resident_parameters(source.config, non_expert, expert_meta, resident_bits)
        progress.total = progress.n + sum(v.nbytes for v in params.values())
        size, checksum = write_resident(params, output / RESIDENT_WEIGHTS_NAME, progress)
        resident_files = [{"file": RESIDENT_WEIGHTS_NAME, "bytes": size, "checksum": checksum}]
        if vision:
            resident_files.append(_write_vision(vision, output, progress))
    if note:
        echo(note)
    files = _write_metadata(source, out_config, output, keep_vision=bool(vision))
    _check_loads(output)
    for layer in plan.layers:
        layer.checksums = [journal.checksums[f"{layer.layer}/{e}"] if writer.wanted(layer.layer, e) else ""
                           for e in range(layer.num_experts)]  # "": a record another rank holds
    manifest = Manifest(
        name=plan.name, source=plan.source_label, revision=source.revision, model_type=source.config["model_type"],
        config=out_config, experts_per_token=plan.experts_per_token, expert_layers=plan.layers,
        resident_quantization=out_config.get("quantization"),
        resident_files=resident_files, settings=plan.settings, files=files,
        vision={"file": VISION_WEIGHTS_NAME, "tensors": len(vision)} if vision else None,
    )
    faults.point("manifest")
    manifest.write(output)
    faults.point("finish")
    shutil.rmtree(output / PARTIAL_DIR, ignore_errors=True)
    return manifest


def _write_vision(tensors: Dict[str, TensorInfo], output: Path, progress) -> dict:
    """The vision encoder's tensors as the source has them (names, dtype, quantization): mlx-vlm sanitizes
    them when it loads them. Returns its resident_files entry."""
    import mlx.core as mx

    params = {}
    by_file: Dict[Path, list] = {}
    for key, info in tensors.items():
        by_file.setdefault(info.file, []).append(key)
    for file, keys in by_file.items():
        loaded = mx.load(str(file))
        params.update({k: loaded[k] for k in keys})
    progress.total += sum(v.nbytes for v in params.values())
    size, checksum = write_resident(params, output / VISION_WEIGHTS_NAME, progress)
    return {"file": VISION_WEIGHTS_NAME, "bytes": size, "checksum": checksum}


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


def _write_metadata(source: Source, config: dict, output: Path, keep_vision: bool = False) -> list:
    """Copy config.json and the tokenizer files; returns their manifest entries (sizes and checksums)."""
    from mlx_lm.utils import save_config

    root = source.directory.parent.parent if source.repo_id else source.directory
    for name in ("config.json", *TOKENIZER_FILES):  # replaced, never written through (a link may point anywhere)
        if (output / name).is_symlink():
            (output / name).unlink()
    save_config(dict(config), output / "config.json", keep_vision_config=keep_vision)
    for name in TOKENIZER_FILES:
        src = source.directory / name
        if src.exists() or src.is_symlink():
            shutil.copyfile(checked_file(source.directory, name, root), output / name)
    return [{"file": name, "bytes": (output / name).stat().st_size, "checksum": file_checksum(output / name)}
            for name in ("config.json", *TOKENIZER_FILES) if (output / name).exists()]


def _check_loads(output: Path) -> None:
    """The resident weights must load into mlx-lm's model class with strict checking."""
    from ..engine.loader import load_resident_model

    try:
        load_resident_model(output, lazy=True)
    except (ValueError, KeyError) as e:
        raise FlashMoeError(f"the converted resident weights do not load into mlx-lm: {one_line(e)}")
