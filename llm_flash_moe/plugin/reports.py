"""How the CLI shows things: sizes, tables, a model's summary, prepare command lines and the eval report. Only the
CLI imports this."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import List, Optional

from .. import registry
from .demo import DEMO_NAME, DEMO_SOURCE


INFO_FIELDS = [
    ("Name", "name"), ("Model id", "model_id"), ("Directory", "directory"), ("Source", "source"),
    ("Revision", "revision"), ("Model type", "model_type"), ("Inputs", "inputs"), ("Expert layers", "expert_layers"),
    ("Experts per layer", "experts_per_layer"), ("Experts per token", "experts_per_token"),
    ("Expert bits", "expert_bits"), ("Expert group size", "expert_group_size"),
    ("Resident quantization", "resident_quantization"), ("Expert record", "expert_record_bytes"),
    ("Experts on disk", "expert_bytes"), ("Resident weights", "resident_bytes"),
    ("Reads per token", "read_per_token_bytes"), ("Expert bank here", "bank_bytes"),
    ("Bank holds", "bank_share"), ("Format version", "format_version"),
]


def manifest_summary(m, path: Path) -> dict:
    """The manifest without per-record checksums: what a person wants to know about the model."""
    layers = m.expert_layers
    record = layers[0].layout.record_size if layers else 0
    quant = m.resident_quantization
    return {
        "name": m.name,
        "model_id": registry.model_id(m.name),
        "directory": str(path),
        "source": m.source,
        "revision": m.revision,
        "model_type": m.model_type,
        "inputs": "text and images (vision encoder kept)" if m.vision else "text only (no vision encoder)",
        "expert_layers": len(layers),
        "experts_per_layer": m.num_experts,
        "experts_per_token": m.experts_per_token,
        "expert_bits": m.bits,
        "expert_group_size": layers[0].quantization.group_size if layers else None,
        "resident_quantization": (f"{quant.get('bits')}-bit, group {quant.get('group_size')}"
                                  if isinstance(quant, dict) else "none"),
        "expert_record_bytes": record,
        "expert_bytes": m.expert_bytes,
        "resident_bytes": m.resident_bytes,
        "read_per_token_bytes": sum(layer.layout.record_size for layer in layers) * m.experts_per_token,
        "format_version": m.format_version,
        "settings": m.settings,
    }


def repair_command(manifest, path: Path) -> str:
    """The `prepare --repair` command line that matches the options ``manifest`` was prepared with."""
    return prepare_command(manifest.settings, path, repair=True)


def prepare_command(settings: dict, path: Path, repair: bool = False) -> str:
    """The `prepare` command line of these settings (a manifest's, or an unfinished prepare's plan)."""
    s, name, source = settings, settings["name"], settings["source"]
    if source == DEMO_SOURCE:
        args = ["llm", "flash-moe", "prepare", "--demo"]
    else:
        args = ["llm", "flash-moe", "prepare", source]
        if s.get("revision"):
            args += ["--revision", s["revision"]]
    if name != (DEMO_NAME if source == DEMO_SOURCE else registry.name_from_source(source)):
        args += ["--name", name]
    for option, key, default in (("--bits", "bits", 4), ("--group-size", "group_size", 64),
                                 ("--resident-bits", "resident_bits", 4)):
        if s.get(key, default) != default:
            args += [option, str(s[key])]
    args += ["--experts-per-token", str(s["experts_per_token"])]
    if Path(path).resolve() != registry.default_output(name).resolve():
        args += ["--output", str(path)]
    return " ".join(shlex.quote(a) for a in args + ["--repair"] * repair)


def bank_share(manifest, bank_experts: int) -> str:
    """What a bank of ``bank_experts`` slots holds of ``manifest``'s experts, and what one takes there and on disk."""
    everything = sum(layer.num_experts for layer in manifest.expert_layers)
    share = (f"all {everything:,} experts" if bank_experts >= everything
             else f"{bank_experts:,} of {everything:,} experts ({bank_experts / everything:.0%})")
    layout = manifest.expert_layers[0].layout
    if layout.parts_bytes < layout.record_size:
        share += (f"; an expert takes {human_bytes(layout.parts_bytes)} there, {human_bytes(layout.record_size)} "
                  "on disk with its record's padding")
    return share


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def rounded(value, digits: int = 3):
    """A result with every float rounded to ``digits`` decimals (a time of 1687.7774457500009 ms: 1687.777)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def format_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report, text_name: str) -> str:
    """An evaluate.Report as the table `llm flash-moe eval` prints."""
    ref = report.reference
    lines = [f"{text_name}: {report.tokens:,} tokens in {report.windows} window"
             f"{'s' * (report.windows != 1)} of up to {report.window}; reference: {ref.name} "
             f"({ref.bits}-bit experts, {ref.experts_per_token} per token)", ""]
    header = ["model", "bits", "experts", "perplexity", "vs ref", "top-1 agree", "KL nats/token", "read/token",
              "seconds"]
    rows = []
    for r in report.results:
        change = "-" if r.reference else f"{(r.perplexity / ref.perplexity - 1) * 100:+.1f}%"
        rows.append([r.name, r.bits, f"{r.experts_per_token}{' (ref)' if r.reference else ''}",
                     f"{r.perplexity:.4f}", change, f"{r.top1_agreement:.4f}", f"{r.kl_mean:.5f}",
                     human_bytes(int(r.as_dict()["bytes_read_per_token"])), f"{r.seconds:.1f}"])
    lines.append(format_table(header, rows))
    return "\n".join(lines)
