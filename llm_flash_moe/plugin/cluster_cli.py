"""``llm flash-moe worker``: the command ``mlx.launch`` runs on every machine of a cluster (see ``worker``).

Imported on every llm command: mlx is imported only inside the command.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="worker")
@click.argument("name")
@click.option("--popularity", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Balance the experts across the ranks by these measured counts (JSON: "
                   '{"layers": {"<layer>": [count per expert, ...]}}) instead of round-robin. Rank 0 only.')
def worker(name, popularity):
    """Serve NAME as one rank of a cluster; run it on every machine through MLX's launcher:

    \b
        mlx.launch --hosts IP_OF_THIS_MAC,IP_OF_OTHER_MAC --backend ring -- llm flash-moe worker NAME

    The first host is rank 0, the machine you then run `llm -m NAME-flash ...` on (any number of llm
    commands, `llm chat` included, one at a time); the others receive token ids from it and compute
    their share of the experts. Ctrl-C stops the cluster; llm then runs NAME alone again.
    """
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from .. import registry
    from ..cluster.ring import launcher_nodes
    from ..cluster.worker import register_cluster, supervise

    rank, nodes = launcher_nodes()
    model_dir = registry.model_dir(name)
    if rank == 0:
        code = register_cluster(model_dir, nodes, popularity)
    else:
        if popularity is not None:
            click.echo("Warning: --popularity is read on rank 0 only; the map comes from there", err=True)
        code = supervise(model_dir, rank, nodes)
    raise SystemExit(code)


@click.command(name="popularity")
@click.argument("name")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text like what you will ask the model (UTF-8).")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the counts (JSON), for prepare/worker --popularity.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Count over the first N tokens of the text.")
@click.option("--window", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens run through the model at a time (each window on its own).")
@click.option("--experts", type=click.IntRange(min=1), help="Experts per token (default: the model's).")
def popularity(name, text_file, out_file, max_tokens, window, experts):
    """Count how often each expert of NAME is chosen on a text, for balancing a cluster's ranks.

    \b
        llm flash-moe popularity qwen397 --text sample.txt --out qwen397-counts.json
        llm flash-moe prepare --rank 1 --ranks 2 --popularity qwen397-counts.json   # on each machine
    """
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from .. import registry
    from ..engine.loader import load_flash_model
    from ..cluster.ownership import write_counts
    from ..cluster.popularity import count_choices

    flash = load_flash_model(registry.model_dir(name), experts_per_token=experts)
    try:
        tokens = flash.tokenizer.encode(text_file.read_text(encoding="utf-8"))[:max_tokens]
        counts = count_choices(flash, tokens, window)
    finally:
        flash.close()
    write_counts(out_file, counts)
    click.echo(f"Counted the experts chosen for {len(tokens):,} tokens in {len(counts)} layers: {out_file}")
