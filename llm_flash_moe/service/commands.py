"""``llm flash-moe ps``, ``stop [NAME]`` and ``serve NAME [--http [HOST:]PORT]``: the engines.

Imported on every llm command: the engine's modules are imported inside the commands.
"""

from __future__ import annotations

import time

import click


def running() -> dict:
    """Model name -> the status of its engine, for every engine that answers."""
    from . import client, protocol

    out = {}
    for path in sorted(protocol.engines_dir().glob("*.json")):
        try:
            import json

            name = json.loads(path.read_text())["model"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        status = client.request(name, {"type": "status"})
        if status is not None and status.get("type") == "status":
            out[name] = status
    return out


@click.command(name="ps")
def ps():
    """List the running engines: model, pid, memory, expert bank, idle time, commands waiting, the cluster
    it leads (ranks), socket.

    An engine keeps a model loaded between llm commands (`-o keep_alive`, default 300 s); its log is in
    the same directory as its state file. While `llm flash-moe worker` runs a cluster for a model, its
    engine is rank 0 and leads the workers.
    """
    from ..plugin.reports import format_table, human_bytes

    engines = running()
    if not engines:
        click.echo("No flash-moe engine is running.")
        return
    rows = [[name, str(s["pid"]), human_bytes(s["rss_bytes"] or 0), human_bytes(s["peak_rss_bytes"] or 0),
             human_bytes(s["bank_bytes"]) if s["loaded"] else "not loaded", human_bytes(s["bytes_read"]),
             "busy" if s["busy"] else f"{s['idle_seconds']:.0f} s", str(s["waiting"]),
             "forever" if s["keep_alive"] is None else f"{s['keep_alive']:g} s",
             f"{s['ranks']} ranks" if s.get("ranks") else "-", s["socket"]]
            for name, s in engines.items()]
    click.echo(format_table(["model", "pid", "memory", "peak", "bank", "read", "idle", "waiting", "keep_alive",
                             "cluster", "socket"], rows))
    click.echo(f"logs: {next(iter(engines.values()))['log'].rsplit('/', 1)[0]}/")


@click.command(name="stop")
@click.argument("name", required=False)
def stop(name):
    """End the engine of NAME (every engine without NAME); a generation in progress stops at once."""
    from .. import registry
    from . import client, protocol

    engines = running()
    names = [registry.name_of(name)] if name else sorted(engines)
    if name and names[0] not in engines:
        click.echo(f"No engine of {names[0]} is running.")
        return
    for model in names:
        pid = engines[model]["pid"]
        client.request(model, {"type": "stop"})
        deadline = time.monotonic() + 15
        while protocol.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if protocol.alive(pid):
            client.retire(pid, protocol.socket_path(model))
        click.echo(f"Stopped the engine of {model} (pid {pid})")
    if not names:
        click.echo("No flash-moe engine is running.")


@click.command(name="serve")
@click.argument("name")
@click.option("--http", "http", metavar="[HOST:]PORT",
              help="Also serve the OpenAI-compatible API (/v1/models, /v1/chat/completions) on this port "
                   "(host 127.0.0.1 unless given). Needs the `serve` extra: pip install 'llm-flash-moe[serve]'.")
@click.option("--keep-alive", type=click.FloatRange(min=0), default=None,
              help="Exit after this many idle seconds (default: run until Ctrl-C or `llm flash-moe stop`).")
def serve(name, http, keep_alive):
    """Run the engine of NAME in the foreground: llm commands use it (as they use the one they start
    themselves), and with --http so do editors and chat UIs that speak the OpenAI API.

    \b
        llm flash-moe serve qwen397 --http 8000
        curl http://127.0.0.1:8000/v1/models
    """
    import os

    from .. import registry
    from . import client, protocol

    name = registry.name_of(name)
    registry.model_dir(name)
    if http is not None:
        from .http import parse_address

        parse_address(http)  # a bad address fails before anything starts
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    with client.start_lock(name):
        client.hello(name, "", replace=True)  # a background engine of NAME is replaced by this one
    from .server import run_engine

    click.echo(f"Serving {name} (pid {os.getpid()}); its log is this terminal. Ctrl-C stops it.", err=True)
    click.echo(f"socket: {protocol.socket_path(name)}", err=True)
    run_engine(name, keep_alive, http=http)
