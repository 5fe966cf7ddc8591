"""The llm plugin end to end, through llm's own CLI, on a tiny random-weight model.

The tiny model (real qwen3_5_moe architecture, tiny dims, tiny BPE tokenizer with the Qwen3.5
specials and chat template) is prepared once per session; each test gets a fresh LLM_USER_PATH
in which that model is registered as ``tiny``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import llm
from llm.cli import cli

from conftest import logged_turns
from llm_flash_moe.plugin import cli as flash_cli
from llm_flash_moe import registry
from llm_flash_moe.engine import session
from llm_flash_moe.plugin import settings
from llm_flash_moe.plugin.answer import ReplySplitter, opens_reasoning

pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

NAME = "tiny"
MODEL = "tiny-flash"
NO_THINK = ["-o", "thinking", "0"]
GREEDY = ["-o", "temperature", "0"]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    """The tiny model's tokenizer, loaded independently of the plugin."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(autouse=True)
def fresh_prompt_cache():
    """Snapshots kept in memory by earlier tests (same model, same process) must not serve this one."""
    from llm_flash_moe.engine import prompt_cache

    prompt_cache.MEMORY.clear()
    yield
    prompt_cache.MEMORY.clear()


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def render(tokenizer, messages, thinking=True) -> list:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking)


def decoded_prompt(call) -> str:
    return call["tokenizer"].decode(call["prompt"])


def one_line_error(result) -> str:
    out = result.output.strip()
    assert result.exit_code != 0, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]


# ------------------------------------------------------------------------------ the reasoning splitter


def split_all(text_chunks, **kw):
    splitter = ReplySplitter(("<think>", "</think>"), **kw)
    events = []
    for chunk in text_chunks:
        events += splitter.feed(chunk)
    events += splitter.finish()
    merged = {"reasoning": "", "text": ""}
    for kind, chunk in events:
        assert chunk
        merged[kind] += chunk
    return merged, events


def chunkings(text):
    """The text whole, char by char, and in pieces of 2, 3 and 5."""
    yield [text]
    for n in (1, 2, 3, 5):
        yield [text[i:i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("text,in_reasoning,reasoning,answer", [
    ("Let me think.\nOK.\n</think>\n\nThe answer is 4.", True, "Let me think.\nOK.", "The answer is 4."),
    ("\n</think>\n\nHi", True, "", "Hi"),
    ("<think>\nhmm\n</think>\n\nHi there", False, "hmm", "Hi there"),
    ("  <think>a < b</think>x</think>", False, "a < b", "x</think>"),
    ("Just an answer with <think> inside", False, "", "Just an answer with <think> inside"),
    ("still thinking when cut off\n\n", True, "still thinking when cut off", ""),
    ("<thin", False, "", "<thin"),
    ("a </thin b</think>c", True, "a </thin b", "c"),
])
def test_splitter(text, in_reasoning, reasoning, answer):
    for chunks in chunkings(text):
        merged, _ = split_all(chunks, in_reasoning=in_reasoning)
        assert merged == {"reasoning": reasoning, "text": answer}, chunks


def test_splitter_streams_without_waiting_for_the_end():
    splitter = ReplySplitter(("<think>", "</think>"), in_reasoning=True)
    assert splitter.feed("one two") == [("reasoning", "one two")]
    assert splitter.feed(" three\n") == [("reasoning", " three")]  # trailing newline held back
    assert splitter.feed("</th") == []
    assert splitter.feed("ink>\n\nAns") == [("text", "Ans")]
    assert splitter.feed("wer") == [("text", "wer")]


def test_splitter_without_think_tags():
    splitter = ReplySplitter(None, in_reasoning=True)
    assert splitter.feed("<think>x</think>") + splitter.finish() == [("text", "<think>x</think>")]


def test_prompt_opens_reasoning(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    on = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True)
    off = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert opens_reasoning(tokenizer, on)
    assert not opens_reasoning(tokenizer, off)


# ------------------------------------------------------------------------------ plugin registration


def test_import_loads_no_mlx(user_path):
    """Every llm command imports the plugin and calls its hooks: no mlx/numpy/transformers there.

    (llm itself may import numpy: only modules that appear after ``import llm`` count.)
    """
    code = (
        "import sys, click, llm\n"
        "before = set(sys.modules)\n"
        "import llm_flash_moe, llm_flash_moe.plugin.models, llm_flash_moe.plugin.cli\n"
        "ids = [m.model_id for m in llm.get_models()]\n"
        "assert 'tiny-flash' in ids and 'qwen397-flash' in ids, ids\n"
        "llm_flash_moe.register_commands(click.Group())\n"
        "heavy = ('mlx', 'mlx_lm', 'numpy', 'transformers', 'torch', 'safetensors', 'huggingface_hub', 'llguidance')\n"
        "print(sorted({m for m in set(sys.modules) - before if m.split('.')[0] in heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LLM_USER_PATH": str(user_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_llm_plugins_lists_us(user_path):
    plugins = json.loads(run("plugins").output)
    ours = [p for p in plugins if p["name"] == "llm-flash-moe"]
    assert ours and {"register_models", "register_commands"} <= set(ours[0]["hooks"])


def test_models_lists_flagship_and_prepared(user_path):
    out = run("models").output
    assert "Flash MoE: qwen397-flash" in out
    assert "Flash MoE: tiny-flash" in out


def test_models_options(user_path):
    out = run("models", "--options", "-m", MODEL).output
    for option in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "experts", "thinking",
                   "bank_gb"):
        assert f"{option}:" in out
    assert f"default {settings.DEFAULT_MAX_TOKENS}" in out


def test_prepare_choices_match_the_converter():
    """Every choice `prepare` offers is one the converter accepts, and the converter refuses the others."""
    from llm_flash_moe import flash_layout
    from llm_flash_moe.conversion.plan import PrepareOptions, check_options
    from llm_flash_moe.errors import FlashMoeError

    options = {o.name: o for o in flash_cli.prepare.params}
    choices = {"group_size": options["group_size"].type.choices,
               "resident_bits": options["resident_bits"].type.choices, "bits": flash_cli.EXPERT_BITS}
    assert choices == {"group_size": tuple(map(str, flash_layout.GROUP_SIZES)),
                       "resident_bits": tuple(map(str, flash_layout.RESIDENT_BITS)),
                       "bits": tuple(map(str, flash_layout.EXPERT_BITS))}
    for option, values in choices.items():
        for value in values:
            check_options(PrepareOptions(**{option: int(value)}))
        with pytest.raises(FlashMoeError):
            check_options(PrepareOptions(**{option: 5}))


# ------------------------------------------------------------------------------ prompts


def test_prompt_answers_and_streams(user_path):
    response = llm.get_model(MODEL).prompt("hello there", temperature=0, max_tokens=8, thinking=False)
    chunks = list(response)
    assert len(chunks) > 1 and "".join(chunks).strip()
    result = run("-m", MODEL, "hello there", *GREEDY, "-o", "max_tokens", "8", *NO_THINK)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "".join(chunks).strip()
    no_stream = run("-m", MODEL, "hello there", *GREEDY, "-o", "max_tokens", "8", *NO_THINK, "--no-stream")
    assert no_stream.stdout == result.stdout


def test_usage_and_response_json_logged(user_path, spy, tokenizer):
    result = run("-m", MODEL, "hello there", *GREEDY, "-o", "max_tokens", "12", "-o", "experts", "3",
                 "-o", "bank_gb", "0.001")
    assert result.exit_code == 0, result.output
    (call,) = spy
    expected_prompt = render(tokenizer, [{"role": "user", "content": "hello there"}], thinking=True)
    assert call["prompt"] == expected_prompt
    (row,) = logged_turns(user_path)
    assert row["input_tokens"] == len(expected_prompt)
    assert row["output_tokens"] == len(call["responses"]) == call["responses"][-1].generation_tokens
    assert 1 <= row["output_tokens"] <= 12
    logged = json.loads(run("logs", "--json", "-n", "1").output)[0]
    assert logged["input_tokens"] == row["input_tokens"] and logged["output_tokens"] == row["output_tokens"]
    rj = logged["response_json"]
    assert json.loads(row["response_json"]) == rj
    assert rj["finish_reason"] in ("stop", "length")
    assert rj["prompt_tokens"] == row["input_tokens"]
    assert rj["generation_tokens"] == row["output_tokens"]
    assert rj["experts_per_token"] == 3
    assert rj["prompt_tps"] > 0 and rj["generation_tps"] > 0
    assert rj["expert_reads"] > 0 and rj["bytes_read"] > 0
    assert rj["bytes_read"] == rj["expert_reads"] * 16384  # one whole record per read (tiny record: 16 KiB)
    assert 0.0 <= rj["bank_hit_rate"] <= 1.0 and rj["bank_hits"] > 0  # hits within the response
    assert 0 < rj["bank_gb"] <= 0.001  # 1 MB: all 32 tiny experts (16 KiB records, fewer bytes of arrays)
    assert rj["read_seconds"] >= 0 and rj["peak_memory_gb"] > 0


def test_options_apply_per_response(user_path):
    """experts and the bank statistics belong to each response, not to the loaded model's lifetime; the
    bank outlives a response, so asking the same again reads nothing.
    (The prompt cache is off: with it the second run would process only what the first did not keep.)"""
    args = ["-m", MODEL, "hi", *GREEDY, "-o", "max_tokens", "4", *NO_THINK, "-o", "prompt_cache", "0"]
    for extra in ([], [], ["-o", "experts", "1"], []):
        assert run(*args, *extra).exit_code == 0
    first, second, one_expert, back = (json.loads(t["response_json"]) for t in logged_turns(user_path))
    assert first["expert_reads"] + first["bank_hits"] > 0
    assert second["expert_reads"] == second["bytes_read"] == 0 and second["bank_hit_rate"] == 1.0
    assert second["bank_hits"] == first["bank_hits"] + first["expert_reads"] - first["prefetch_reads"]
    assert one_expert["experts_per_token"] == 1 and one_expert["bank_hits"] < second["bank_hits"]
    assert back["experts_per_token"] == 2


def test_seed_repeats_sampling(user_path):
    args = ["-m", MODEL, "hi", "-o", "temperature", "1.5", "-o", "max_tokens", "8", *NO_THINK]
    outputs = [run(*args, "-o", "seed", seed).stdout for seed in ("7", "7", "8")]
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_system_prompt_reaches_the_template(user_path, spy):
    result = run("-m", MODEL, "-s", "You are Bob the tester", "hi", *GREEDY, "-o", "max_tokens", "3")
    assert result.exit_code == 0, result.output
    text = decoded_prompt(spy[0])
    assert text.startswith("<|im_start|>system\nYou are Bob the tester<|im_end|>\n<|im_start|>user\nhi<|im_end|>")


def test_continue_includes_history(user_path, spy, tokenizer):
    first = run("-m", MODEL, "My name is Zorblax", *GREEDY, "-o", "max_tokens", "6", *NO_THINK)
    assert first.exit_code == 0, first.output
    follow = run("-c", "What is my name?", *GREEDY, "-o", "max_tokens", "6", *NO_THINK)
    assert follow.exit_code == 0, follow.output
    t1, t2 = logged_turns(user_path)
    assert t1["thread_id"] == t2["thread_id"] and t2["model"] == MODEL
    answer1 = json.loads(run("logs", "--json", "-n", "2").output)[0]["response"]
    expected = render(tokenizer, [{"role": "user", "content": "My name is Zorblax"},
                                  {"role": "assistant", "content": answer1},
                                  {"role": "user", "content": "What is my name?"}], thinking=False)
    assert spy[1]["prompt"] == expected
    assert t2["input_tokens"] == len(expected) > t1["input_tokens"]
    assert "Zorblax" in decoded_prompt(spy[1])


def test_cid_picks_the_conversation(user_path, spy):
    args = [*GREEDY, "-o", "max_tokens", "3", *NO_THINK]
    assert run("-m", MODEL, "Remember apples", *args).exit_code == 0
    first_thread = logged_turns(user_path)[0]["thread_id"]
    assert run("-m", MODEL, "Remember bananas", *args).exit_code == 0
    result = run("--cid", first_thread, "What fruit?", *args)
    assert result.exit_code == 0, result.output
    text = decoded_prompt(spy[2])
    assert "apples" in text and "bananas" not in text
    assert logged_turns(user_path)[2]["thread_id"] == first_thread


def test_chat_answers_twice_from_one_load(user_path, spy, monkeypatch):
    from llm_flash_moe.engine import loader as engine

    session.unload()
    loads = []
    real = engine.load_flash_model

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "load_flash_model", counting_load)
    result = run("chat", "-m", MODEL, *GREEDY, "-o", "max_tokens", "4", *NO_THINK, "-s", "Be brief",
                 input="first question\nsecond question\nquit\n")
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
    assert len(spy) == 2
    t1, t2 = logged_turns(user_path)
    assert t1["thread_id"] == t2["thread_id"]
    second = decoded_prompt(spy[1])
    assert "Be brief" in second and "first question" in second and "second question" in second
    assert t2["input_tokens"] > t1["input_tokens"] + 4


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args", [
    ["-o", "temperature", "-1"],
    ["-o", "max_tokens", "0"],
    ["-o", "top_p", "2"],
    ["-o", "bank_gb", "-1"],
    ["-o", "nonsense", "1"],
])
def test_bad_options_rejected_by_llm(user_path, args):
    result = run("-m", MODEL, "hi", *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["99999", "0", "-3"])
def test_experts_out_of_range_is_one_line(user_path, value):
    """Too many and too few experts get the same line, from the model's own bound (not pydantic's)."""
    line = one_line_error(run("-m", MODEL, "hi", "-o", "experts", value))
    assert line == f"Error: -o experts must be between 1 and 8 for {MODEL} (default 2), not {value}"


def test_unprepared_flagship_says_how_to_prepare(user_path):
    line = one_line_error(run("-m", "qwen397-flash", "hi"))
    assert "`llm flash-moe prepare`" in line and "223 GB" in line


def test_flash_moe_error_during_generation_is_one_line(user_path, monkeypatch):
    from llm_flash_moe.errors import FlashMoeError

    def broken(*args, **kwargs):
        raise FlashMoeError("expert file layer-000.bin is truncated; run `llm flash-moe prepare` again")
        yield

    monkeypatch.setattr(mlx_lm, "stream_generate", broken)
    line = one_line_error(run("-m", MODEL, "hi"))
    assert "truncated" in line


# ------------------------------------------------------------------------------ reasoning through llm


def scripted(texts):
    """A stand-in for mlx_lm.stream_generate that yields ``texts`` as the model's output."""

    def stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        for i, text in enumerate(texts):
            yield SimpleNamespace(text=text, token=0, prompt_tokens=len(prompt), prompt_tps=100.0,
                                  generation_tokens=i + 1, generation_tps=10.0, peak_memory=0.5,
                                  finish_reason="stop" if i == len(texts) - 1 else None)

    return stream_generate


THOUGHT = ["Let me", " think about", " it.\n", "</th", "ink>\n\n", "The answer", " is 4."]


def test_reasoning_is_separate_from_the_answer(user_path, monkeypatch):
    monkeypatch.setattr(mlx_lm, "stream_generate", scripted(THOUGHT))
    shown = run("-m", MODEL, "2+2?")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == "The answer is 4."
    assert "Let me think about it." in shown.stderr
    hidden = run("-m", MODEL, "2+2?", "-R")
    assert hidden.stdout.strip() == "The answer is 4."
    assert "Let me" not in hidden.stderr
    logged = json.loads(run("logs", "--json", "-n", "1").output)[0]
    assert logged["response"] == "The answer is 4."
    assert logged["reasoning"] == "Let me think about it."
    rows = logged_turns(user_path)
    assert rows[-1]["output_tokens"] == len(THOUGHT)


def test_no_reasoning_when_thinking_off(user_path, monkeypatch, spy):
    monkeypatch.setattr(mlx_lm, "stream_generate", scripted(["Plain", " answer"]))
    result = run("-m", MODEL, "hi", *NO_THINK)
    assert result.stdout.strip() == "Plain answer" and result.stderr == ""
    assert json.loads(run("logs", "--json", "-n", "1").output)[0]["reasoning"] is None


def test_history_leaves_reasoning_out(user_path, monkeypatch, spy):
    monkeypatch.setattr(mlx_lm, "stream_generate", scripted(THOUGHT))
    assert run("-m", MODEL, "2+2?").exit_code == 0
    assert run("-c", "and 3+3?").exit_code == 0
    second = decoded_prompt(spy[1])
    assert "The answer is 4." in second and "Let me think" not in second


# ------------------------------------------------------------------------------ llm flash-moe commands


@pytest.fixture
def removable(user_path, tiny_model, tmp_path):
    """A copy of the tiny model registered as ``scratch`` (safe to delete)."""
    path = tmp_path / "scratch"
    shutil.copytree(tiny_model, path)
    registry.register("scratch", path)
    return path


def test_flash_moe_models(user_path):
    out = run("flash-moe", "models").output
    header, rule, *rows = out.splitlines()
    assert header.split()[:3] == ["name", "model", "id"]
    assert any(r.split()[:4] == [NAME, MODEL, "4", "2"] for r in rows)
    assert "qwen397-flash is not prepared yet" in out


def test_flash_moe_info(user_path, tiny_model):
    out = run("flash-moe", "info", NAME).output
    assert "Model id:" in out and MODEL in out and str(tiny_model) in out
    assert "qwen3_5_moe" in out
    data = json.loads(run("flash-moe", "info", MODEL, "--json").output)
    assert data["name"] == NAME and data["experts_per_layer"] == 8 and data["experts_per_token"] == 2
    assert data["expert_layers"] == 4 and data["expert_bits"] == "4"
    assert data["read_per_token_bytes"] == data["expert_record_bytes"] * 4 * 2
    from llm_flash_moe.flash_layout import Manifest

    everything = sum(l.num_experts * l.layout.parts_bytes for l in Manifest.load(tiny_model).expert_layers)
    assert data["bank_bytes"] == everything and data["bank_share"].startswith("all 32 experts")  # this machine holds it
    assert "Expert bank here:" in out and "Bank holds:" in out


def test_flash_moe_info_unknown_is_one_line(user_path):
    line = one_line_error(run("flash-moe", "info", "nosuch"))
    assert "nosuch" in line


def test_flash_moe_remove_asks(user_path, removable):
    result = run("flash-moe", "remove", "scratch", input="n\n")
    assert result.exit_code != 0
    assert removable.exists() and "scratch" in registry.registered()


def test_flash_moe_remove(user_path, removable):
    assert "scratch-flash" in run("models").output
    result = run("flash-moe", "remove", "scratch-flash", "--yes")
    assert result.exit_code == 0, result.output
    assert not removable.exists()
    assert "scratch" not in registry.registered()
    assert "scratch-flash" not in run("models").output
    line = one_line_error(run("flash-moe", "remove", "scratch", "--yes"))
    assert "scratch" in line


def test_flash_moe_remove_refuses_foreign_directory(user_path, tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    registry.register("foreign", foreign)
    one_line_error(run("flash-moe", "remove", "foreign", "--yes"))
    assert (foreign / "keep.txt").exists()


def test_prepare_bad_source_is_one_line(user_path, tmp_path):
    one_line_error(run("flash-moe", "prepare", str(tmp_path / "missing" / "dir")))
    one_line_error(run("flash-moe", "prepare", "--demo", "some/repo"))
