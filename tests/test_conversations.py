"""Conversations that do not re-read the model: prompt-cache reuse, tool calling, async, thinking.

On the tiny prepared model (real qwen3_5_moe architecture and Qwen3.5 chat template, random weights),
through llm's own CLI and Python API. "Cold" below means mlx-lm's stream_generate on the whole prompt
with a fresh cache: every reused state must give the same tokens and bit-identical log-probabilities.
Tool calls are forced by steering the sampler (the model runs, and fills its caches, as usual; only the
choice of each token is scripted).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import llm
from llm.cli import cli

from conftest import logged_turns
from llm_flash_moe.plugin import models as plugin
from llm_flash_moe.engine import prompt_cache, session
from llm_flash_moe import registry
from llm_flash_moe.plugin.answer import ReplySplitter

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
common_prefix_len = pytest.importorskip("mlx_lm.utils").common_prefix_len

NAME = "tiny"
MODEL = "tiny-flash"
GREEDY = ["-o", "temperature", "0"]
NO_THINK = ["-o", "thinking", "0"]
WEATHER = 'def get_weather(city: str) -> str:\n    "The weather in a city"\n    return "sunny in " + city\n'


# ------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture
def flash(tiny_model):
    """The plugin's loaded model (the same object the plugin generates with)."""
    return session.load(tiny_model)


def run(*args, input=None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def logged(user_dir: Path) -> list:
    rows = logged_turns(user_dir)
    for row in rows:
        row["response_json"] = json.loads(row["response_json"])
    return rows


def tokens_of(call) -> list:
    return [r.token for r in call["responses"]]


def cold(flash, prompt_ids, max_tokens, sampler=None):
    """Cold full prefill: mlx-lm alone, fresh cache, the whole prompt. [(token, logprobs)]."""
    from mlx_lm.sample_utils import make_sampler

    flash.set_experts_per_token(flash.manifest.experts_per_token)
    return [(r.token, r.logprobs) for r in mlx_lm.stream_generate(
        flash.model, flash.tokenizer, prompt_ids, max_tokens=max_tokens, sampler=sampler or make_sampler(0.0))]


def assert_same_as_cold(flash, call, sampler=None):
    reference = cold(flash, call["prompt"], len(call["responses"]), sampler)
    assert [t for t, _ in reference] == tokens_of(call)
    for (_, expected), response in zip(reference, call["responses"]):
        assert mx.array_equal(expected, response.logprobs)  # bit-identical, not merely the same argmax


def snapshot_files(user_dir: Path) -> list:
    return sorted((user_dir / "flash-moe" / "prompt-cache" / NAME).glob("*.safetensors"))


def steer(monkeypatch, flash, scripts):
    """Make each response's sampler emit the next script's tokens, then <|im_end|>."""
    tokenizer = flash.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    queue = [tokenizer.encode(s, add_special_tokens=False) + [end] for s in scripts]

    def make_sampler(settings):
        return scripted_sampler(queue.pop(0) if queue else [end], end)

    monkeypatch.setattr(plugin, "make_sampler", make_sampler)
    return queue


def scripted_sampler(ids, end):
    ids = list(ids)

    def sampler(logprobs):
        return mx.array([ids.pop(0) if ids else end])

    return sampler


# ------------------------------------------------------------------------------ prompt-cache reuse


@pytest.mark.parametrize("thinking", [False, True])
def test_follow_ups_process_only_new_tokens_and_match_cold(user_path, spy, flash, thinking):
    first = ["-o", "max_tokens", "10", *GREEDY] + ([] if thinking else NO_THINK)
    run("-m", MODEL, "Tell me about the quick brown fox", *first)
    run("-c", "What is the weather like in Paris?", *GREEDY, "-o", "max_tokens", "10")
    run("-c", "Numbers: 1 2 3", *GREEDY, "-o", "max_tokens", "10")
    rows = logged(user_path)
    t1, t2, t3 = (r["response_json"] for r in rows)
    assert [r["thinking"] for r in (t1, t2, t3)] == [thinking] * 3
    assert t1["prompt_tokens_cached"] == 0 and t1["prompt_tokens_processed"] == t1["prompt_tokens"]
    tokenizer = flash.tokenizer
    answers = [r["response"] for r in json.loads(run("logs", "--json", "-n", "3").output)]
    for before, after, rj, previous, answer in ((spy[0], spy[1], t2, t1, answers[0]),
                                                (spy[1], spy[2], t3, t2, answers[1])):
        cached = rj["prompt_tokens_cached"]
        # Everything the two prompts share is reused, and the rest is all that is processed:
        assert cached == common_prefix_len(before["prompt"], after["prompt"]) > 0
        assert cached in previous["prompt_cache_saved"]
        assert rj["prompt_tokens_processed"] == rj["prompt_tokens"] - cached == len(after["prompt"]) - cached
        assert rj["prompt_cache"] == "memory"
        # ... which is where Qwen3.5's template goes on with the previous answer, without its reasoning.
        assert tokenizer.decode(after["prompt"][:cached]).endswith("<|im_start|>assistant\n")
        rest = tokenizer.decode(after["prompt"][cached:])
        assert rest.startswith(answer.strip() + "<|im_end|>\n<|im_start|>user\n")
        assert_same_as_cold(flash, after)
    assert t3["prompt_tokens_cached"] > t2["prompt_tokens_cached"]
    assert t2["prompt_tokens_processed"] < t2["prompt_tokens"] and t3["prompt_tokens_processed"] < t3["prompt_tokens"]


def test_persisted_cache_survives_a_new_process(user_path, flash):
    run("-m", MODEL, "My name is Zorblax", *GREEDY, "-o", "max_tokens", "8", *NO_THINK)
    (t1,) = logged(user_path)
    saved = t1["response_json"]["prompt_cache_saved"]
    assert saved and len(snapshot_files(user_path)) == 1
    out = subprocess.run([sys.executable, "-m", "llm", "-c", "What is my name?", *GREEDY, "-o", "max_tokens", "8"],
                         capture_output=True, text=True, env={**os.environ, "LLM_USER_PATH": str(user_path)},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    t2 = logged(user_path)[1]
    rj = t2["response_json"]
    assert rj["prompt_cache"] == "disk" and rj["prompt_tokens_cached"] == saved[0]
    assert rj["prompt_tokens_processed"] == t2["input_tokens"] - saved[0] and rj["thinking"] is False
    # The same history through a cold full prefill (prompt cache off) says the same.
    answer1, answer2 = (r["response"] for r in json.loads(run("logs", "--json", "-n", "2").output))
    assert answer2.strip() == out.stdout.strip()
    again = llm.get_model(MODEL).prompt("What is my name?", messages=[llm.user("My name is Zorblax"),
                                                                      llm.assistant(answer1)],
                                        temperature=0, max_tokens=8, thinking=False, prompt_cache=False)
    assert again.text() == answer2
    assert again.response_json["prompt_tokens_cached"] == 0
    assert again.response_json["prompt_tokens"] == t2["input_tokens"]


def test_disk_hit_in_process_matches_cold(user_path, spy, flash):
    run("-m", MODEL, "Hello, world!", *GREEDY, "-o", "max_tokens", "6", *NO_THINK)
    prompt_cache.MEMORY.clear()  # as if this were a new process
    run("-c", "How are you today?", *GREEDY, "-o", "max_tokens", "6")
    rj = logged(user_path)[1]["response_json"]
    assert rj["prompt_cache"] == "disk" and rj["prompt_tokens_cached"] > 0
    assert_same_as_cold(flash, spy[1])


def test_changed_system_prompt_is_a_full_prefill(user_path, spy, flash):
    args = [*GREEDY, "-o", "max_tokens", "6", *NO_THINK]
    run("-m", MODEL, "-s", "You are Bob", "hello there", *args)
    run("-c", "and again", *args)
    changed = run("-m", MODEL, "-s", "You are Alice", "hello there", *args)
    reference = run("-m", MODEL, "-s", "You are Alice", "hello there", *args, "-o", "prompt_cache", "0")
    rows = [r["response_json"] for r in logged(user_path)]
    assert rows[1]["prompt_tokens_cached"] > 0
    assert rows[2]["prompt_tokens_cached"] == 0 and rows[2]["prompt_cache"] is None
    assert rows[2]["prompt_tokens_processed"] == rows[2]["prompt_tokens"]
    assert rows[3]["prompt_tokens_cached"] == 0 and rows[3]["prompt_cache_saved"] == []
    assert changed.stdout == reference.stdout and tokens_of(spy[2]) == tokens_of(spy[3])
    assert_same_as_cold(flash, spy[2])


def test_edited_history_reuses_only_what_is_unchanged(user_path, spy, flash):
    model = llm.get_model(MODEL)
    opts = dict(temperature=0, max_tokens=6, thinking=False)
    first = model.prompt("My name is Zorblax", **opts)
    first.text()
    checkpoint = first.response_json["prompt_cache_saved"][0]
    history = [llm.user("My name is Zorblax"), llm.assistant(first.text())]
    follow = model.prompt("What is my name?", messages=history, **opts)
    follow.text()
    edited = model.prompt("What is my name?", messages=[llm.user("My name is Zorblax"),
                                                        llm.assistant("I edited this answer")], **opts)
    edited.text()
    other = model.prompt("What is my name?", messages=[llm.user("My name is Bob"), llm.assistant(first.text())],
                         **opts)
    other.text()
    assert follow.response_json["prompt_tokens_cached"] == checkpoint
    assert edited.response_json["prompt_tokens_cached"] == checkpoint  # the unchanged first user turn
    assert "I edited this answer" in flash.tokenizer.decode(spy[2]["prompt"][checkpoint:])
    assert other.response_json["prompt_tokens_cached"] == 0  # the first message changed: a full prefill
    for call in spy[1:]:
        assert_same_as_cold(flash, call)


def test_other_experts_per_token_or_reprepared_model_never_reuse(user_path, tiny_model, tmp_path):
    args = [*GREEDY, "-o", "max_tokens", "4", *NO_THINK]
    run("-m", MODEL, "hi", *args)
    run("-c", "again", *args, "-o", "experts", "1")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    registry.register("copy", copy)
    run("-m", "copy-flash", "hi", *args)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"] += " (prepared again)"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    run("-c", "again", *args)
    rows = [r["response_json"] for r in logged(user_path)]
    assert rows[1]["prompt_tokens_cached"] == 0  # other experts per token: other states
    assert rows[3]["prompt_tokens_cached"] == 0  # the manifest changed: a re-prepared model
    session.unload(copy)


def test_disk_cache_size_limit_and_lru_eviction(user_path, monkeypatch):
    args = [*GREEDY, "-o", "max_tokens", "6", *NO_THINK]
    run("-m", MODEL, "one", *args)
    run("-c", "two", *args)
    run("-c", "three", *args)
    files = sorted(snapshot_files(user_path), key=lambda f: len(_tokens_of(f)))
    assert len(files) == 3
    for age, path in enumerate(files):
        os.utime(path, (1000 + age, 1000 + age))
    sizes = [f.stat().st_size for f in files]
    lengths = [len(_tokens_of(f)) for f in files]
    assert prompt_cache.evict(sizes[1] + sizes[2]) == [files[0]]  # the least recently used goes first
    # A hit refreshes a file's place: it then outlives a newer, unused one.
    store = prompt_cache.DiskStore(files[1].parent)
    length, caches = store.longest(_identity_of(files[1]), _tokens_of(files[1]) + [1])
    assert length == len(_tokens_of(files[1])) and caches is not None
    assert prompt_cache.evict(max(sizes)) == [files[2]]
    # The limit applies when a turn writes its snapshot.
    limit = int(2.2 * sizes[2])
    monkeypatch.setenv(prompt_cache.DISK_ENV, str(limit / 1e9))
    run("-c", "four", *args)
    after = snapshot_files(user_path)
    newest = max(after, key=lambda f: len(_tokens_of(f)))
    assert len(_tokens_of(newest)) > lengths[2] and sum(f.stat().st_size for f in after) <= limit
    monkeypatch.setenv(prompt_cache.DISK_ENV, "0")  # 0: memory only, nothing written
    run("-c", "five", *args)
    assert snapshot_files(user_path) == after
    assert logged(user_path)[-1]["response_json"]["prompt_tokens_cached"] > 0  # from memory


def _metadata(path):
    _, meta = mx.load(str(path), return_metadata=True)
    return meta


def _identity_of(path) -> str:
    return _metadata(path)["0.identity"]


def _tokens_of(path) -> list:
    return json.loads(_metadata(path)["0.tokens"])


def test_damaged_snapshot_is_dropped_not_fatal(user_path, spy, flash):
    args = [*GREEDY, "-o", "max_tokens", "6", *NO_THINK]
    run("-m", MODEL, "hello there", *args)
    (path,) = snapshot_files(user_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    prompt_cache.MEMORY.clear()
    run("-c", "and now?", *args)
    rj = logged(user_path)[1]["response_json"]
    assert rj["prompt_tokens_cached"] == 0 and not path.exists()
    assert_same_as_cold(flash, spy[1])


def test_chat_reuses_state_in_memory(user_path, spy, flash):
    run("chat", "-m", MODEL, *GREEDY, "-o", "max_tokens", "6", *NO_THINK, "-s", "Be brief",
        input="first question\nsecond question\nthird question\nquit\n")
    rows = [r["response_json"] for r in logged(user_path)]
    assert [r["prompt_cache"] for r in rows] == [None, "memory", "memory"]
    assert rows[1]["prompt_tokens_cached"] == rows[0]["prompt_cache_saved"][0]
    assert rows[2]["prompt_tokens_cached"] == rows[1]["prompt_cache_saved"][0]
    for call in spy[1:]:
        assert_same_as_cold(flash, call)


# ------------------------------------------------------------------------------ thinking across turns


def test_thinking_choice_sticks_for_the_conversation(user_path, spy):
    args = [*GREEDY, "-o", "max_tokens", "4"]
    run("-m", MODEL, "hi", *args, *NO_THINK)
    run("-c", "more", *args)
    run("-c", "and think now", *args, "-o", "thinking", "1")
    run("-c", "more", *args)
    run("-m", MODEL, "a new conversation", *args)
    assert [r["response_json"]["thinking"] for r in logged(user_path)] == [False, False, True, True, True]
    decoded = [spy[0]["turn"].flash.tokenizer.decode(c["prompt"]) for c in spy]
    assert decoded[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert decoded[3].endswith("<|im_start|>assistant\n<think>\n")
    # Thinking on or off, the earlier turns render the same: the cache is reused across the switch.
    assert all(r["response_json"]["prompt_tokens_cached"] > 0 for r in logged(user_path)[1:4])


# ------------------------------------------------------------------------------ tool calling


TOOL_CALL = ("I should look up the weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n"
             "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>")
TOOL_ANSWER = "It is sunny.\n</think>\n\nThe weather in Paris is sunny."


def test_tool_call_round_trip(user_path, spy, flash, monkeypatch):
    steer(monkeypatch, flash, [TOOL_CALL, TOOL_ANSWER])
    result = run("-m", MODEL, "--functions", WEATHER, "What is the weather in Paris?", "-o", "max_tokens", "80")
    assert result.stdout.strip().endswith("The weather in Paris is sunny.")
    first, second = logged(user_path)
    logs = json.loads(run("logs", "--json", "-n", "2").output)
    assert logs[0]["tool_calls"][0]["name"] == "get_weather"
    assert logs[0]["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert logs[1]["tool_results"][0]["output"] == "sunny in Paris"
    assert logs[1]["response"] == "The weather in Paris is sunny."
    tokenizer = flash.tokenizer
    prompt1 = tokenizer.decode(spy[0]["prompt"])
    assert "# Tools" in prompt1 and '"name": "get_weather"' in prompt1 and '"city"' in prompt1
    prompt2 = tokenizer.decode(spy[1]["prompt"])
    assert "<tool_response>\nsunny in Paris\n</tool_response><|im_end|>" in prompt2
    # Qwen's template renders the tool-calling turn (reasoning included) exactly as it was generated,
    # so the results turn processes only the tool response and its own generation prompt.
    rj1, rj2 = first["response_json"], second["response_json"]
    full = len(spy[0]["prompt"]) + len(spy[0]["responses"])
    assert spy[1]["prompt"][:full] == spy[0]["prompt"] + tokens_of(spy[0])
    assert rj2["prompt_tokens_cached"] == full and full in rj1["prompt_cache_saved"]
    assert tokenizer.decode(spy[1]["prompt"][full:]).startswith("\n<|im_start|>user\n<tool_response>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert_same_as_cold(flash, spy[1], scripted_sampler(tokens_of(spy[1]), end))
    # A new user message afterwards: the history drops the tool turn's reasoning, so it goes on from
    # the first turn's checkpoint.
    steer(monkeypatch, flash, ["Fine.\n</think>\n\nYou are welcome."])
    run("-c", "Thanks!", "--functions", WEATHER, "-o", "max_tokens", "40")
    rj3 = logged(user_path)[2]["response_json"]
    assert rj3["prompt_tokens_cached"] == min(rj1["prompt_cache_saved"])
    assert tokenizer.decode(spy[2]["prompt"][:rj3["prompt_tokens_cached"]]).endswith("<|im_start|>assistant\n")
    assert_same_as_cold(flash, spy[2], scripted_sampler(tokens_of(spy[2]), end))


def test_tool_calls_through_the_python_api(user_path, flash, monkeypatch):
    def get_weather(city: str) -> str:
        "The weather in a city"
        return f"rainy in {city}"

    steer(monkeypatch, flash, [TOOL_CALL, TOOL_ANSWER])
    model = llm.get_model(MODEL)
    assert model.supports_tools
    chain = model.chain("Weather in Paris?", tools=[get_weather], options={"max_tokens": 80})
    assert chain.text().endswith("The weather in Paris is sunny.")
    first, second = chain._responses
    (call,) = first.tool_calls()
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"} and call.tool_call_id
    assert second.prompt.tool_results[0].output == "rainy in Paris"
    assert second.response_json["prompt_tokens_cached"] > first.response_json["prompt_tokens"]


def test_no_tools_no_parsing(user_path, flash, monkeypatch):
    steer(monkeypatch, flash, [TOOL_CALL.split("</think>\n\n")[1]])
    result = run("-m", MODEL, "hi", *NO_THINK, "-o", "max_tokens", "60")
    assert "<tool_call>" in result.stdout and "get_weather" in result.stdout
    assert json.loads(run("logs", "--json", "-n", "1").output)[0]["tool_calls"] in (None, [])


def filtered(chunks):
    f = ReplySplitter(None, ("<tool_call>", "</tool_call>"))
    events = []
    for chunk in chunks:
        events += f.feed(chunk)
    events += f.finish()
    merged = []
    for kind, chunk in events:
        if merged and merged[-1][0] == kind == "text":
            merged[-1] = (kind, merged[-1][1] + chunk)
        else:
            merged.append((kind, chunk))
    return merged


@pytest.mark.parametrize("text,expected", [
    ("Let me check.\n\n<tool_call>\nA\n</tool_call>", [("text", "Let me check."), ("call", "\nA\n")]),
    ("<tool_call>A</tool_call>\n<tool_call>B</tool_call>\n", [("call", "A"), ("call", "B")]),
    ("Just text, a < b and <tool not a call>  ", [("text", "Just text, a < b and <tool not a call>  ")]),
    ("x <tool_call>unterminated", [("text", "x"), ("open_call", "unterminated")]),
    ("<tool_call>A</tool_call> then text", [("call", "A"), ("text", "then text")]),
])
def test_tool_call_filter(text, expected):
    for n in (len(text), 1, 2, 3, 7):
        assert filtered([text[i:i + n] for i in range(0, len(text), n)]) == expected, n


def test_unparseable_call_is_shown_as_text(user_path, flash, monkeypatch):
    # The tool-call constraint (plugin/constrained.py) makes such a call impossible to sample; without it (tool
    # formats it has no grammar for), this is what the parser does.
    monkeypatch.setattr(plugin.constrained, "for_response", lambda *args: None)
    steer(monkeypatch, flash, ["<tool_call>\nno function here\n</tool_call>"])
    result = run("-m", MODEL, "--functions", WEATHER, "hi", *NO_THINK, "-o", "max_tokens", "60")
    assert "<tool_call>\nno function here\n</tool_call>" in result.stdout
    assert len(logged(user_path)) == 1  # no call, so no chained second turn


# ------------------------------------------------------------------------------ async


def test_async_cli_streams_and_logs(user_path):
    args = ["-m", MODEL, "hello there", *GREEDY, "-o", "max_tokens", "8", *NO_THINK]
    sync = run(*args)
    prompt_cache.MEMORY.clear()
    shutil.rmtree(user_path / "flash-moe" / "prompt-cache")
    asynchronous = run("--async", *args)
    assert asynchronous.stdout == sync.stdout
    rows = logged(user_path)
    assert len(rows) == 2 and rows[1]["output_tokens"] == rows[0]["output_tokens"]
    for key in ("prompt_tokens", "prompt_tokens_processed", "generation_tokens", "finish_reason"):
        assert rows[1]["response_json"][key] == rows[0]["response_json"][key]


def workers():
    return [t for t in threading.enumerate() if t.name.startswith("flash-moe-tiny")]


def test_async_api_streams_chunks_and_joins_its_thread(user_path):
    model = llm.get_async_model(MODEL)
    assert model.supports_tools and isinstance(model, plugin.FlashMoeAsyncModel)

    async def whole():
        response = model.prompt("hello there", temperature=0, max_tokens=10, thinking=False)
        chunks = [chunk async for chunk in response]
        return chunks, response

    async def stop_early():
        response = model.prompt("hello there", temperature=0, max_tokens=200, thinking=False)
        async for _ in response:
            break
        await response._generator.aclose()
        return response

    chunks, response = asyncio.run(whole())
    assert len(chunks) > 1 and "".join(chunks).strip()
    assert response.response_json["generation_tokens"] == response.output_tokens <= 10
    assert response.response_json["prompt_tokens_processed"] > 0
    assert not workers()
    sync = llm.get_model(MODEL).prompt("hello there", temperature=0, max_tokens=10, thinking=False)
    assert sync.text() == "".join(chunks)
    early = asyncio.run(stop_early())
    assert not workers()
    assert early.response_json["finish_reason"] == "interrupted"
    assert early.response_json["generation_tokens"] < 200


def test_async_errors_are_raised_in_the_caller(user_path):
    model = llm.get_async_model(MODEL)

    async def go():
        return await model.prompt("hi", experts=99999).text()

    with pytest.raises(llm.ModelError, match="between 1 and 8"):
        asyncio.run(go())
    assert not workers()


@pytest.mark.parametrize("ending", ["stop", "length"])
def test_nothing_is_computed_or_read_for_a_token_after_the_answer_ends(user_path, spy, flash, monkeypatch, ending):
    """mlx-lm feeds every sampled token back before handing it out; the last one (<|im_end|>, or the
    max_tokens-th) is not fed when no saved state needs it: the model sees prompt + answer - 1 tokens."""
    fed = []
    model_class = type(flash.model)
    real = model_class.__call__

    def counting(self, inputs, *args, **kwargs):
        fed.append(inputs.shape[-1])
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(model_class, "__call__", counting)
    from llm_flash_moe.engine import prefill

    layer_major = prefill.layer_major_prefill

    def counting_prefill(model, cache, tokens, **kw):  # the prompt but its last token, layer by layer
        fed.append(len(tokens))
        return layer_major(model, cache, tokens, **kw)

    monkeypatch.setattr(prefill, "layer_major_prefill", counting_prefill)
    steer(monkeypatch, flash, ["one two three four"])
    max_tokens = "50" if ending == "stop" else "3"
    before = replace(flash.bank.stats)
    result = run("-m", MODEL, "hi", *NO_THINK, "-o", "max_tokens", max_tokens, "-o", "prompt_cache", "0")
    assert result.exit_code == 0, result.output
    (call,) = spy
    answer = len(call["responses"])
    assert call["responses"][-1].finish_reason == ending
    assert answer == (int(max_tokens) if ending == "length" else len(flash.tokenizer.encode(
        "one two three four", add_special_tokens=False)) + 1)
    assert sum(fed) == len(call["prompt"]) + answer - 1
    decode_calls = fed.count(1) - 1  # the prompt went through in one prefill, then its last token
    moe_layers = len(flash.manifest.expert_layers)
    assert flash.bank.stats.since(before).requested >= decode_calls * moe_layers * flash.experts_per_token
