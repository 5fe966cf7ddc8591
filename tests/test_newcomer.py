"""The rough edges a new user met (issue 25): each one says what is wrong and what to do, in one line.

A closed pipe, an answer cut off inside its reasoning, a config.json without a shape field, `info` and
`verify` on an unfinished prepare, the bank `info` shows, `-o bank_gb 0`, `eval --against` a model of another
architecture or vocabulary, and `bench`'s figures and files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llm.cli import cli

from llm_flash_moe import registry

pytest.importorskip("mlx.core")

LLM = str(Path(sys.executable).with_name("llm"))
MODEL = "tiny-flash"


@pytest.fixture(autouse=True)
def no_model_loaded():
    """Each test starts and ends with no model loaded in this process (a bank it filled would serve the next
    test's reads)."""
    from llm_flash_moe.engine import session

    session.unload()
    yield
    session.unload()


def run(*args):
    return CliRunner().invoke(cli, list(args))


def one_error_line(result) -> str:
    """The command failed with exit status 1 and one ``Error:`` line, no traceback; returns the line."""
    out = result.output.strip()
    assert result.exit_code == 1, out
    assert "Traceback" not in out and isinstance(result.exception, SystemExit), (out, result.exception)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]


# ------------------------------------------------------------------------------ a closed pipe


def test_a_closed_pipe_ends_the_listing_quietly(user_path):
    """`llm flash-moe models | head`: the reader is gone before anything is written (deterministically: its end
    of the pipe is closed at once), and the command stops quietly with status 0."""
    proc = subprocess.Popen([LLM, "flash-moe", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


# ------------------------------------------------------------------------------ cut off while reasoning


def test_an_answer_cut_off_inside_the_reasoning_says_so(user_path):
    result = run("-m", MODEL, "hi", "-o", "temperature", "0", "-o", "max_tokens", "3", "-o", "thinking", "1")
    assert result.exit_code == 0, result.output
    logged = json.loads(run("logs", "--json", "-n", "1").output)[0]
    assert logged["response"] == "" and logged["reasoning"], logged  # the tiny model was still thinking
    assert result.stdout.strip() == ""
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: the answer was cut off by max_tokens (3) while the model was still reasoning, "
                        "so it has no answer; raise -o max_tokens or turn thinking off with -o thinking false"]


def test_an_answer_cut_off_after_the_reasoning_says_nothing(user_path):
    result = run("-m", MODEL, "hi", "-o", "temperature", "0", "-o", "max_tokens", "3", "-o", "thinking", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "Warning" not in result.stderr


# ------------------------------------------------------------------------------ an unfinished prepare


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny qwen3_5_moe checkpoint (tiny tokenizer)."""
    from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("newcomer") / "tiny", TinySpec(), tokenizer="tiny")


def test_info_verify_and_eval_name_an_unfinished_prepare_and_the_command_that_finishes_it(
        source, llm_user, monkeypatch, tmp_path):
    import shlex

    from llm_flash_moe.conversion import experts

    real_write, calls = experts.ExpertRecordWriter._write, {"n": 0}

    def write(self, *args):  # Ctrl-C after a few expert units
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_write(self, *args)

    monkeypatch.setattr(experts.ExpertRecordWriter, "_write", write)
    monkeypatch.setattr(experts, "COMMIT_EVERY_BYTES", 1)
    stopped = run("flash-moe", "prepare", str(source), "--name", "half", "--bits", "3")
    assert stopped.exit_code == 1 and "Error: interrupted" in stopped.output, stopped.output
    monkeypatch.undo()
    monkeypatch.setenv("LLM_USER_PATH", str(llm_user))
    out = registry.default_output("half")
    assert "unfinished prepare" in run("flash-moe", "models").output
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 20)
    command = f"llm flash-moe prepare {shlex.quote(str(source))} --name half --bits 3 --experts-per-token 2"
    for args in (["info", "half"], ["info", "half-flash", "--json"], ["verify", "half"],
                 ["eval", "half", "--text", str(text)]):
        line = one_error_line(run("flash-moe", *args))
        assert line == (f"Error: half is an unfinished prepare ({out}): run `{command}` again to finish it, or "
                        "`llm flash-moe remove half` to delete it"), (args, line)
    finished = run(*shlex.split(command)[1:])  # the command it names finishes it
    assert finished.exit_code == 0, finished.output
    assert run("flash-moe", "info", "half").exit_code == 0
    assert "no prepared model named 'nothing'" in one_error_line(run("flash-moe", "info", "nothing"))


# ------------------------------------------------------------------------------ the bank info shows, bank_gb 0


def test_info_shows_the_bank_as_the_experts_it_holds(user_path, tiny_model, monkeypatch):
    from llm_flash_moe.bank import memory
    from llm_flash_moe.flash_layout import Manifest

    manifest = Manifest.load(tiny_model)
    layout = manifest.expert_layers[0].layout
    assert layout.parts_bytes < layout.record_size  # tiny experts: most of a 16 KiB record is padding
    data = json.loads(run("flash-moe", "info", "tiny", "--json").output)  # this machine holds every expert
    assert data["bank_experts"] == 32 and data["bank_bytes"] == 32 * layout.parts_bytes
    shown = run("flash-moe", "info", "tiny").output
    assert "100%" not in shown
    assert (f"Bank holds:             all 32 experts; an expert takes {layout.parts_bytes / 1e3:.1f} kB there, "
            f"{layout.record_size / 1e3:.1f} kB on disk with its record's padding") in shown
    # A machine with room for 10 experts once the weights are in (free = reserve + weights + 10 experts):
    total = 8_000_000_000
    free = memory.reserve_bytes(total) + manifest.resident_bytes + 10 * layout.parts_bytes
    monkeypatch.setattr(memory, "bank_memory", lambda: (free, total))
    data = json.loads(run("flash-moe", "info", "tiny", "--json").output)
    assert data["bank_experts"] == 10 and data["bank_bytes"] == 10 * layout.parts_bytes
    assert data["bank_share"].startswith("10 of 32 experts (31%); ")


@pytest.mark.parametrize("value", ["0", "0.00001"])
def test_a_bank_smaller_than_the_smallest_is_refused_in_one_line(user_path, value):
    line = one_error_line(run("-m", MODEL, "hi", "-o", "max_tokens", "2", "-o", "bank_gb", value))
    assert line.startswith(f"Error: -o bank_gb {float(value):g} is less than the smallest expert bank tiny runs "
                           "with (0.03 MB: twice the experts of one token); give -o bank_gb 0.001 or more"), line
    assert not (user_path / "logs.db").exists() or not json.loads(run("logs", "--json").output)


def test_the_smallest_bank_named_runs_and_is_logged_as_it_is(user_path):
    from llm_flash_moe.engine import session

    result = run("-m", MODEL, "hi", "-o", "max_tokens", "2", "-o", "bank_gb", "0.001")
    assert result.exit_code == 0, result.output
    (flash,) = session._LOADED.values()
    logged = json.loads(run("logs", "--json", "-n", "1").output)[0]["response_json"]
    assert 0 < logged["bank_gb"] == round(flash.bank.nbytes / 1e9, 6) <= 0.001


# ------------------------------------------------------------------------------ eval --against another model


def test_eval_against_another_architecture_or_vocabulary_is_refused(models, tmp_path, monkeypatch):
    import shutil

    from llm_flash_moe.flash_layout import Manifest

    # Built (once per session) in the session's llm user directory, as the other tests build them.
    mine = models.prepared(models.hf("bfloat16"), bits=4)
    same = models.prepared(models.hf("bfloat16"), bits=2)  # another copy of it, at other bits
    wider = models.prepared(models.hf("bfloat16", hidden_size=128), bits=2)  # same tokenizer, another shape
    other = tmp_path / "other-vocab"  # the same shapes, another vocabulary of the same size: two ids swapped
    shutil.copytree(mine, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "user"))
    for name, path in (("mine", mine), ("same", same), ("wider", wider), ("other-vocab", other)):
        registry.register(name, path)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)

    line = one_error_line(run("flash-moe", "eval", "mine", "--against", "wider", "--text", str(text)))
    assert line == ("Error: mine and wider are not copies of the same model (hidden_size 64 and 128): --against "
                    "compares a model with another copy of it prepared at other bits")
    line = one_error_line(run("flash-moe", "eval", "mine", "--against", "other-vocab", "--text", str(text)))
    assert line == ("Error: mine and other-vocab are not copies of the same model (their tokenizer.json differ): "
                    "--against compares a model with another copy of it prepared at other bits")
    result = run("flash-moe", "eval", "same", "--against", "mine", "--text", str(text), "--window", "16", "--json")
    assert result.exit_code == 0, result.output
    assert Manifest.load(same).bits != Manifest.load(mine).bits


# ------------------------------------------------------------------------------ bench: figures and files


def test_bench_rounds_says_where_its_models_are_and_cleans_them(llm_user, monkeypatch):
    """The measurement itself is far too heavy for a unit test (the 397B's layer shapes): it is replaced by one
    that builds a bench model's file and returns the issue's unrounded figure; what the command does with
    them is real."""
    from llm_flash_moe.measure import benchmark

    directory = registry.root() / "bench"
    mine = registry.root() / "bench" / "notes.txt"  # a file of the user's: --clean leaves it

    def measured(opts, log):
        model = Path(opts.directory) / "qwen397-shape-4l-16e-4bit" / "experts"
        model.mkdir(parents=True)
        (model / "layer-000.bin").write_bytes(b"\0" * 1_500_000)
        return {"results": [{"ms_per_token": 1687.7774457500009, "bytes_read_per_token": 3456.5 / 7}]}

    monkeypatch.setattr(benchmark, "run", measured)
    result = run("flash-moe", "bench", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"results": [{"ms_per_token": 1687.777, "bytes_read_per_token": 493.786}]}
    assert result.stderr.strip() == (f"The bench models (1.5 MB) are kept in {directory} for the next run; "
                                     "`llm flash-moe bench --clean` deletes them")
    mine.write_text("mine")
    cleaned = run("flash-moe", "bench", "--clean")
    assert cleaned.exit_code == 0 and cleaned.output.strip() == f"Deleted 1.5 MB of bench models from {directory}"
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]
    mine.unlink()
    assert run("flash-moe", "bench", "--clean").output.strip() == f"No bench models in {directory}"
    assert not directory.exists()
