"""llm-flash-moe: run Mixture-of-Experts models larger than RAM in llm, streaming experts from disk.

The llm hooks only. llm imports every plugin on every command, so this module imports no mlx,
mlx_lm, numpy or transformers, and ``register_models`` reads one small JSON file. It does not import
llm itself either (``llm.hookimpl`` is this pluggy marker), so the engine runs where llm is absent.
"""

import pluggy

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it; CHANGELOG.md: the scheme)

hookimpl = pluggy.HookimplMarker("llm")


@hookimpl
def register_models(register):
    """``qwen397-flash`` always (it explains how to prepare it), and ``<name>-flash`` per prepared model,
    each with its async twin (llm's async API, ``llm --async``)."""
    import sys

    from . import registry
    from .errors import FlashMoeError
    from .plugin.models import FlashMoeAsyncModel, FlashMoeModel

    try:
        prepared = registry.prepared()
    except FlashMoeError as e:  # a damaged models.json must not stop llm (and other plugins' models)
        print(f"Warning: llm-flash-moe: {e}", file=sys.stderr)
        prepared = {}
    names = [registry.FLAGSHIP_NAME] + sorted(set(prepared) - {registry.FLAGSHIP_NAME})
    for name in names:
        register(FlashMoeModel(name), FlashMoeAsyncModel(name))


@hookimpl
def register_commands(cli):
    """``llm flash-moe ...``: prepare, models, info, verify, remove, ps, stop, serve, ..."""
    from .plugin.cli import flash_moe

    cli.add_command(flash_moe)
