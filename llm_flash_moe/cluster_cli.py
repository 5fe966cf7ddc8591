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
    from . import registry
    from .ring import launcher_nodes
    from .worker import register_cluster, supervise

    rank, nodes = launcher_nodes()
    model_dir = registry.model_dir(name)
    if rank == 0:
        code = register_cluster(model_dir, nodes, popularity)
    else:
        if popularity is not None:
            click.echo("Warning: --popularity is read on rank 0 only; the map comes from there", err=True)
        code = supervise(model_dir, rank, nodes)
    raise SystemExit(code)
