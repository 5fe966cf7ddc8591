"""``llm flash-moe bench``: its options (the measurements are ``benchmark`` and ``distributed_bench``).

Imported on every llm command: mlx and numpy are imported only inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .reports import directory_bytes, human_bytes, rounded


@click.command(name="bench")
@click.option("--layers", type=click.IntRange(min=4), default=4, show_default=True,
              help="Decoder layers of the synthetic model (60 is the real depth; at least 4: one "
                   "full-attention layer).")
@click.option("--experts-per-layer", type=click.IntRange(min=16, max=512), default=512, show_default=True,
              help="Experts per layer (the real model has 512; fewer keep a deep model's files on a normal "
                   "disk: 60 layers x 64 experts is 27 GB at 4 bits).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), multiple=True,
              help="Expert bits to measure (repeatable; default 4).")
@click.option("--experts", type=click.IntRange(min=1, max=512), multiple=True,
              help="Experts per token to measure (repeatable; default 4 and 10).")
@click.option("--bank-fraction", "bank_fractions", type=click.FloatRange(min=0, max=1, min_open=True),
              multiple=True,
              help="Expert bank sizes to measure, as a share of all the experts (repeatable; default 1, 0.14 and "
                   "0.25: what a 48 / 64 GB Mac holds of the 397B at 4 bits).")
@click.option("--read-ahead", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Partial banks with reading ahead on the next layer's predicted experts, without, or both.")
@click.option("--memory-limit", "memory_limit_gb", type=click.FloatRange(min=1), default=None,
              help="Decode the partial banks under a cgroup v2 memory.max of this many GB, page cache included.")
@click.option("--tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Timed decoded tokens per measurement; every token is new (no pass is ever repeated).")
@click.option("--warmup-tokens", type=click.IntRange(min=0), default=48, show_default=True,
              help="New tokens decoded before the timed ones in the same stream (the bank fills).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed streams (of new tokens) for the floors and the filled bank; the median is reported.")
@click.option("--prompt-tokens", type=click.IntRange(min=0), multiple=True,
              help="Prompt lengths for the prefill measurement: layer by layer against mlx-lm's chunked loop, "
                   "with the smallest partial bank (repeatable; default 64; 0 skips it; slow on the CPU backend).")
@click.option("--prefill-only", is_flag=True, help="Measure only the prefill of --prompt-tokens (no decode).")
@click.option("--calibration-layers", type=click.IntRange(min=0), default=8, show_default=True,
              help="Layers of the routing-only model measuring the routing at 512 experts (0: skip).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Where the synthetic models are built and kept. Default: flash-moe/bench under llm's "
                   "user directory.")
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Expert parallelism: decode on 1 rank and on this many local ranks (this process and N-1 "
                   "worker processes over MLX's ring backend on loopback), side by side: per rank, bytes read "
                   "per token and time in the all_sums. Uses --layers, --experts-per-layer, the first --bits and "
                   "--bank-fraction, --experts, --tokens, --repeats, --dir.")
@click.option("--json", "json_", is_flag=True, help="Print only the JSON result.")
@click.option("--clean", is_flag=True,
              help="Delete the synthetic models earlier runs built in --dir (and its logs), measure nothing.")
def bench(layers, experts_per_layer, bits, experts, bank_fractions, read_ahead, memory_limit_gb, tokens,
          warmup_tokens, repeats, prompt_tokens, prefill_only, calibration_layers, directory, ranks, json_, clean):
    """Measure decode speed against its floors, mlx-lm and LRU, at any depth and bank size.

    Builds once (then reuses) a synthetic model with Qwen3.5-397B-A17B's per-layer shapes and calibrated
    routing, in --dir; `--clean` deletes them. See docs/PERFORMANCE.md for what each figure is and the results.
    """
    from ..registry import root

    directory = Path(directory or root() / "bench")
    if clean:
        freed = remove_bench_files(directory)
        click.echo(f"Deleted {human_bytes(freed)} of bench models from {directory}" if freed
                   else f"No bench models in {directory}")
        return
    log = (lambda line: None) if json_ else (lambda line: click.echo(line, err=True))
    try:
        if ranks > 1:
            from ..measure.distributed_bench import ClusterBenchOptions, run as run_ranks

            opts = ClusterBenchOptions(ranks=ranks, layers=layers, experts_per_layer=experts_per_layer,
                                       bits=int(bits[0]) if bits else 4, experts=tuple(experts) or (4,),
                                       tokens=tokens, repeats=repeats,
                                       bank_fraction=bank_fractions[0] if bank_fractions else 1.0,
                                       directory=directory)
            result = run_ranks(opts, log=log)
        else:
            from ..measure.benchmark import BenchOptions, run

            defaults = BenchOptions()
            opts = BenchOptions(layers=layers, experts_per_layer=experts_per_layer,
                                bits=tuple(int(b) for b in bits) or defaults.bits,
                                experts=tuple(experts) or defaults.experts,
                                bank_fractions=tuple(bank_fractions) or defaults.bank_fractions,
                                prefetch={"both": (True, False), "on": (True,), "off": (False,)}[read_ahead],
                                memory_limit_gb=memory_limit_gb, tokens=tokens, warmup_tokens=warmup_tokens,
                                repeats=repeats, prompt_tokens=tuple(prompt_tokens) or defaults.prompt_tokens,
                                decode=not prefill_only, calibration_layers=calibration_layers, directory=directory)
            result = run(opts, log=log)
        click.echo(json.dumps(rounded(result), indent=None if json_ else 1))
    finally:
        kept = sum(directory_bytes(p) for p in bench_files(directory))
        if kept:
            click.echo(f"The bench models ({human_bytes(kept)}) are kept in {directory} for the next run; "
                       "`llm flash-moe bench --clean` deletes them", err=True)


BENCH_FILES = ("qwen397-shape-*", "qwen397-routing-*", "cluster-bench-logs")  # what the bench writes in --dir


def bench_files(directory: Path) -> list:
    return sorted(p for pattern in BENCH_FILES for p in Path(directory).glob(pattern))


def remove_bench_files(directory: Path) -> int:
    """Delete what the bench built in ``directory`` (nothing else); the directory too once empty. Returns bytes."""
    import shutil

    freed = 0
    for path in bench_files(directory):
        freed += directory_bytes(path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        directory.rmdir()
    except OSError:  # not empty (other files of yours), or not there
        pass
    return freed
