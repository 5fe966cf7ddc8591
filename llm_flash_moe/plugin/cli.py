"""``llm flash-moe``: prepare, list, inspect, verify, benchmark and remove flash models.

Imported on every llm command (``register_commands``): the converter, mlx and numpy are imported
inside the commands that need them.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import click

from .. import flash_layout, registry
from ..errors import FlashMoeError
from .reports import (INFO_FIELDS, bank_share, directory_bytes, format_report, format_table, human_bytes, manifest_summary,
                      prepare_command, repair_command)

# The format module imports no numpy or mlx, so its choices can be read on every llm command.
EXPERT_BITS, GROUP_SIZES, RESIDENT_BITS = (tuple(map(str, choices)) for choices in (
    flash_layout.EXPERT_BITS, flash_layout.GROUP_SIZES, flash_layout.RESIDENT_BITS))


class BitsRuleParam(click.ParamType):
    """``--bits``: one of EXPERT_BITS, or a per-layer rule (flash_layout.BitsRule); an int when it is one width."""

    name = "BITS"

    def convert(self, value, param, ctx):
        from ..flash_layout import BitsRule

        try:
            rule = BitsRule.parse(value)
        except FlashMoeError as e:
            self.fail(str(e).split("--bits", 1)[-1].lstrip(": "), param, ctx)
        return rule.default if not rule.overrides else str(value).replace(" ", "")


class FlashMoeGroup(click.Group):
    """A click group whose commands report FlashMoeError (and OSError) as one line (``Error: ...``, exit 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `llm flash-moe models | head`: the reader has all it wanted
            quiet_stdout()
            ctx.exit(0)
        except FlashMoeError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a file the command needed could not be read or written
            raise click.ClickException(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush into a closed pipe fails no more."""
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@click.group(name="flash-moe", cls=FlashMoeGroup)
def flash_moe():
    """Run Mixture-of-Experts models larger than RAM, streaming experts from disk.

    Prepare a model once (`llm flash-moe prepare`), then prompt it as `<name>-flash`:

    \b
        llm flash-moe prepare          # Qwen3.5-397B-A17B, about 223 GB on disk
        llm -m qwen397-flash "Hello"

    Try the whole path offline with a small random-weight model:

    \b
        llm flash-moe prepare --demo
        llm -m demo-flash "hi"

    The model stays loaded between commands in a background engine (`-o keep_alive`, default 300 s):
    `llm flash-moe ps` lists the engines, `stop` ends them, `serve NAME --http PORT` adds an
    OpenAI-compatible API.
    """


from .bench_cli import bench as _bench  # noqa: E402 - commands with modules of their own
from .cluster_cli import popularity as _popularity, worker as _worker  # noqa: E402
from ..service.commands import ps as _ps, serve as _serve, stop as _stop  # noqa: E402

for _command in (_bench, _worker, _popularity, _ps, _stop, _serve):
    flash_moe.add_command(_command)


# ------------------------------------------------------------------------------ prepare


@flash_moe.command()
@click.argument("source", required=False)
@click.option("--bits", type=BitsRuleParam(), default="4", show_default=True,
              help="Bits per expert weight (2, 3, 4 or 8), for every layer or per layer: 3,first=4,last=4 "
                   "is 4 bits for the first and last layers, 3 elsewhere (LAYERS=BITS overrides: a layer "
                   "number, negative from the end, a range A..B, first, last). For the flagship's experts: "
                   "8 = 411 GB, 4 = 217 GB, 3 = 169 GB, 2 = 121 GB. 4 keeps quality; 2 is faster but breaks "
                   "JSON and tool calls. `llm flash-moe eval` measures what a choice costs.")
@click.option("--group-size", type=click.Choice(GROUP_SIZES), default="64", show_default=True,
              help="Quantization group size of the experts.")
@click.option("--resident-bits", type=click.Choice(RESIDENT_BITS), default="4", show_default=True,
              help="Bits of the weights kept in memory (attention, embeddings, shared experts); the "
                   "router gates always stay at 8 bits.")
@click.option("--experts-per-token", type=click.IntRange(min=1),
              help="Default experts per token (the model's own count; 4 for qwen397). "
                   "Each prompt can override it with -o experts N.")
@click.option("--name", help="Name of the prepared model, served as <name>-flash "
                             "(default: from the source, qwen397 for the flagship).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write (default: flash-moe/<name> in llm's user directory).")
@click.option("--delete-source", is_flag=True,
              help="Hub sources only: delete each downloaded shard once converted, so the download "
                   "needs one shard of space instead of the whole checkpoint.")
@click.option("--revision", help="Hub sources only: the branch, tag or commit to convert.")
@click.option("--demo", is_flag=True,
              help="Build a small RANDOM-WEIGHT demo model of the real architecture (qwen3_5_moe) with the "
                   "real Qwen3.5 tokenizer, offline, and prepare it as `demo` (served as demo-flash). "
                   "It checks the whole path; its output is not language.")
@click.option("--repair", is_flag=True,
              help="For a model already prepared with these options: verify it (as `llm flash-moe verify`) and "
                   "rewrite only the damaged expert records, plus the resident weights and metadata. "
                   "Reads the source again.")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="Expert parallelism (`llm flash-moe worker`): write only the experts this machine owns as rank "
                   "R of --ranks N (the first host given to mlx.launch is rank 0). Default: every expert.")
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="The number of machines of the cluster, with --rank.")
@click.option("--popularity", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --rank: balance the experts across the ranks by these measured counts (JSON) instead of "
                   "round-robin; give every machine the same file.")
def prepare(source, bits, group_size, resident_bits, experts_per_token, name, output, delete_source,
            revision, demo, repair, rank, ranks, popularity):
    """Convert a checkpoint into the flash layout and register it as <name>-flash.

    SOURCE is a Hugging Face repo id or a local checkpoint directory (HF bf16 release or an MLX
    quantized conversion), by default mlx-community/Qwen3.5-397B-A17B-4bit.

    For the default flagship with the default options the prepared model takes about 223 GB
    (217 GB of 4-bit experts, 6 GB resident); the download takes another 223 GB unless
    --delete-source removes each shard once converted. Space is checked before anything is
    written. An interrupted run (Ctrl-C, a crash, a full disk) resumes where it stopped when run
    again with the same options; a second run on the same output while one is at work is refused.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" advice
    from ..conversion.prepare import Interrupted, PrepareOptions, prepare as run_prepare
    from .demo import prepare_demo

    opts = PrepareOptions(
        source=source or registry.FLAGSHIP_SOURCE, name=name, output=output, bits=bits,
        group_size=int(group_size), resident_bits=int(resident_bits), experts_per_token=experts_per_token,
        delete_source=delete_source, revision=revision, repair=repair, rank=rank, ranks=ranks,
        popularity=popularity,
    )
    if demo and (source or delete_source or revision):
        raise FlashMoeError("--demo builds its own checkpoint: give no SOURCE, --delete-source or --revision")
    try:
        manifest = (prepare_demo if demo else run_prepare)(opts, echo=click.echo)
    except Interrupted as e:  # Ctrl-C: say what is kept and that the same command continues
        raise FlashMoeError(str(e)) from None
    click.echo(f"Prepared {manifest.name}: {human_bytes(manifest.expert_bytes)} of experts, "
               f"{human_bytes(manifest.resident_bytes)} resident"
               f"{' (its vision encoder included)' if manifest.vision else ', text only'}, in "
               f"{registry.model_dir(manifest.name)}")
    click.echo(f"Run it with: llm -m {registry.model_id(manifest.name)} \"your prompt\"")


# ------------------------------------------------------------------------------ models / info


@flash_moe.command(name="models")
def models_command():
    """List prepared models: name, model id, bits, experts per token, sizes, source."""
    from ..flash_layout import Manifest

    rows = []
    for name, path in sorted(registry.registered().items()):
        try:
            m = Manifest.load(path)
            rows.append([name, registry.model_id(name), m.bits, str(m.experts_per_token),
                         human_bytes(m.expert_bytes), human_bytes(m.resident_bytes), m.source])
        except FlashMoeError:
            rows.append([name, registry.model_id(name), "-", "-", "-", "-", f"not prepared ({path})"])
    unfinished = registry.unfinished()
    for name, path in unfinished.items():
        rows.append([name, "-", "-", "-", human_bytes(directory_bytes(path)), "-", f"unfinished prepare ({path})"])
    if rows:
        header = ["name", "model id", "bits", "experts/token", "experts", "resident", "source"]
        click.echo(format_table(header, rows))
    else:
        click.echo("No prepared models. Try `llm flash-moe prepare --demo` (offline, random weights).")
    if unfinished:
        click.echo("An unfinished prepare continues where it stopped when its command is run again; "
                   "`llm flash-moe remove NAME` deletes it.")
    if registry.FLAGSHIP_NAME not in registry.prepared():
        click.echo(registry.not_prepared_message(registry.FLAGSHIP_NAME))


@flash_moe.command()
@click.argument("name")
@click.option("json_", "--json", is_flag=True, help="Output the summary as JSON.")
def info(name, json_):
    """Show a prepared model: source, architecture, quantization, sizes, reads per token, and the expert
    bank it gets on this machine by default. NAME is the model's name (`qwen397`) or id (`qwen397-flash`)."""
    from ..flash_layout import Manifest

    from ..engine.loader import bank_summary

    path = prepared_dir(registry.name_of(name))
    manifest = Manifest.load(path)
    summary = {**manifest_summary(manifest, path), **bank_summary(manifest)}
    summary["bank_share"] = bank_share(manifest, summary["bank_experts"])
    if json_:
        click.echo(json.dumps(summary, indent=2))
        return
    for label, key in INFO_FIELDS:
        value = summary[key]
        if key.endswith("_bytes"):
            value = f"{human_bytes(value)} ({value:,} bytes)"
        if value is None:
            value = "-"
        click.echo(f"{label + ':':<24}{value}")


# ------------------------------------------------------------------------------ verify


@flash_moe.command()
@click.argument("name")
def verify(name):
    """Check a prepared model against the checksums its manifest recorded.

    Reads every expert record and the resident weights once (a progress bar shows the bytes), names
    each damaged `layer L expert E` and each missing, truncated or damaged file, and exits with
    status 1 on any damage, saying how to repair it. NAME is the model's name or model id.
    """
    from ..flash_layout import Manifest
    from ..verify import verify_model

    name = registry.name_of(name)
    path = prepared_dir(name)
    manifest = Manifest.load(path)
    report = verify_model(path, manifest, progress=True)
    if report.ok:
        click.echo(f"{name} is intact: {report.records:,} expert records and the resident weights match their "
                   f"checksums ({human_bytes(report.checked_bytes)} read)")
        return
    for line in report.lines():
        click.echo(line)
    raise FlashMoeError(f"{name} is damaged ({report.summary()}); repair it with `{repair_command(manifest, path)}` "
                        "(it rewrites only the damaged parts, reading the source again)")


def prepared_dir(name: str) -> Path:
    """The directory of prepared model ``name``; an unfinished prepare of it is named as one, with the command
    that finishes it."""
    from ..flash_layout import PARTIAL_DIR

    partial = registry.unfinished().get(name)
    if partial is not None and name not in registry.prepared():
        try:
            command = f"`{prepare_command(json.loads((partial / PARTIAL_DIR / 'plan.json').read_text()), partial)}`"
        except (OSError, ValueError, KeyError, TypeError):
            command = "its `llm flash-moe prepare` command"
        raise FlashMoeError(f"{name} is an unfinished prepare ({partial}): run {command} again to finish it, or "
                            f"`llm flash-moe remove {name}` to delete it")
    return registry.model_dir(name)


# ------------------------------------------------------------------------------ remove


@flash_moe.command(name="eval")
@click.argument("name")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 text to score (e.g. the WikiText-2 test set, or your own documents).")
@click.option("--experts", type=click.IntRange(min=1), multiple=True,
              help="Experts per token to measure (repeatable; default: the model's served default).")
@click.option("--against", help="Compare with this prepared model (e.g. a 4-bit copy of a 2-bit NAME) at its own "
                                "experts per token, instead of NAME at its own experts per token.")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per window; each window is scored on its own.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens of the text.")
@click.option("--compute", type=click.Choice(["auto", "model", "float32"]), default="auto", show_default=True,
              help="Activation dtype: float32 on the CPU backend, the weights' own elsewhere (auto); 'model' "
                   "reproduces mlx-lm bit for bit.")
@click.option("json_", "--json", is_flag=True, help="Print the results as JSON.")
def eval_command(name, text_file, experts, against, window, max_tokens, compute, json_):
    """Measure what experts per token and expert bits cost in quality, on your text.

    Runs NAME over the text in windows, streaming experts from disk as generation does, once for the
    reference (NAME at the model's own experts per token, or the --against model) and once per --experts
    setting, and reports each one's perplexity, its top-1 agreement with the reference and the mean
    KL(reference || setting) per token, with the bytes of experts read. For example:

    \b
        llm flash-moe eval qwen397 --text wiki.test.raw --experts 10 --experts 4 --max-tokens 4096
        llm flash-moe eval qwen397-2bit --against qwen397 --experts 10 --text wiki.test.raw
    """
    from ..engine.loader import load_flash_model
    from ..measure.evaluate import Configuration, check_comparable, evaluate, native_experts_per_token, tokenize, windows_of
    from ..flash_layout import Manifest

    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FlashMoeError(f"{text_file} is not UTF-8 text ({e.reason} at byte {e.start})")
    name = registry.name_of(name)
    if against:
        against = registry.name_of(against)
        mine, theirs = prepared_dir(name), prepared_dir(against)
        check_comparable(name, Manifest.load(mine), mine, against, Manifest.load(theirs), theirs)
    flash = load_flash_model(prepared_dir(name), compute=compute)
    other = None
    try:
        if against:
            other = flash if against == name else load_flash_model(prepared_dir(against), compute=compute)
            reference = Configuration(against, other, native_experts_per_token(other.manifest))
        else:
            reference = Configuration(name, flash, native_experts_per_token(flash.manifest))
        configurations = [Configuration(name, flash, k) for k in dict.fromkeys(experts or [flash.experts_per_token])]
        for config in configurations:
            flash_layout.check_experts_per_token(config.experts, flash.manifest.num_experts, "--experts")
        ids = tokenize(text, [reference] + configurations)[:max_tokens]
        from huggingface_hub.utils import tqdm

        scored = sum(len(w) - 1 for w in windows_of(ids, window))
        with tqdm(total=scored, unit="tok", desc=f"Evaluating {name}") as bar:
            report = evaluate(configurations, reference, ids, window, progress=bar.update)
    finally:
        flash.close()
        if other is not None and other is not flash:
            other.close()
    if json_:
        click.echo(json.dumps({"text": str(text_file), **report.as_dict()}, indent=1))
    else:
        click.echo(format_report(report, text_file.name))


@flash_moe.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def remove(name, yes):
    """Delete a prepared model's files and its registration.

    NAME is the model's name (`demo`) or model id (`demo-flash`). An unfinished `prepare`
    in the default directory of NAME is removed too.
    """
    from ..conversion.checkpoint import TOKENIZER_FILES
    from ..flash_layout import PARTIAL_DIR
    from ..integrity import is_ours, remove_ours

    name = registry.name_of(name)
    path = registry.registered().get(name)
    if path is None:
        partial = registry.default_output(name)
        if not (partial / PARTIAL_DIR).exists() or name in registry.RESERVED_NAMES:
            raise FlashMoeError(f"no prepared model named {name!r}; see `llm flash-moe models`")
        path = partial
    if path.exists() and not is_ours(path):
        raise FlashMoeError(f"{path} was not made by `llm flash-moe prepare` (it has no {flash_layout.OWNER_MARKER} "
                            "and no flash-moe manifest): nothing deleted; delete it yourself if you mean to")
    if not yes:
        size = human_bytes(directory_bytes(path)) if path.exists() else "already gone"
        click.confirm(f"Delete {name} ({path}, {size}) and its saved conversation states?", abort=True)
    from ..engine import prompt_cache
    from ..conversion.journal import Journal
    from ..engine.session import unload

    journal = None
    if (path / PARTIAL_DIR).exists():
        journal = Journal(path)
        journal.lock()  # refuses while a `prepare` is writing it: never delete files under a running converter
    unload(path)
    try:
        kept = remove_ours(path, TOKENIZER_FILES)  # what the layout names; files someone else put there stay
    finally:
        if journal is not None:
            journal.unlock()
    prompt_cache.forget(name)
    if name in registry.registered():
        registry.unregister(name)
    click.echo(f"Removed {name}" + (f"; kept what it did not write in {path}: {', '.join(kept)}" if kept else ""))
