"""The llm model: ``<name>-flash`` runs a prepared model, streaming its experts from disk.

Nothing here imports mlx / mlx_lm at module level: llm imports every plugin on every command.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import llm
from pydantic import Field, field_validator

from . import registry
from .errors import FlashMoeError

DEFAULT_MAX_TOKENS = 4096
DEFAULT_TEMPERATURE = 0.6  # Qwen3.5's generation_config.json (thinking-mode sampling)
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 20
DEFAULT_MIN_P = 0.0

# What `llm flash-moe prepare` (flagship defaults: 4-bit experts, group 64, 4-bit resident) writes,
# and what it downloads first (the MLX 4-bit release) unless --delete-source drops each shard once used.
FLAGSHIP_PREPARED_GB = 223
FLAGSHIP_DOWNLOAD_GB = 223

# Prepared models loaded by this process: (directory, manifest mtime) -> FlashModel. `llm chat` loads once.
_LOADED: Dict[Tuple[str, int], object] = {}


def model_id_for(name: str) -> str:
    return name + registry.MODEL_SUFFIX


def not_prepared_message(name: str) -> str:
    """The one line shown when a listed model is used before `llm flash-moe prepare` made it."""
    model_id = model_id_for(name)
    if name == registry.FLAGSHIP_NAME:
        return (
            f"{model_id} is not prepared yet: run `llm flash-moe prepare` (downloads "
            f"{registry.FLAGSHIP_SOURCE}; needs about {FLAGSHIP_PREPARED_GB + FLAGSHIP_DOWNLOAD_GB} GB free disk: "
            f"{FLAGSHIP_PREPARED_GB} GB prepared + {FLAGSHIP_DOWNLOAD_GB} GB download, or about "
            f"{FLAGSHIP_PREPARED_GB + 5} GB with `llm flash-moe prepare --delete-source`)"
        )
    return (
        f"{model_id} is not prepared (no complete model in {registry.default_output(name)}): run "
        f"`llm flash-moe prepare SOURCE --name {name}` again, or `llm flash-moe remove {name}`"
    )


# ------------------------------------------------------------------------------ reasoning split


class _StreamSplitter:
    """Splits streamed text as its ``_step`` decides; ``feed`` returns ``[(kind, chunk), ...]``."""

    buffer = ""

    def feed(self, text: str) -> List[Tuple[str, str]]:
        self.buffer += text
        events: List[Tuple[str, str]] = []
        while self.buffer and self._step(events):
            pass
        return [(kind, chunk) for kind, chunk in events if chunk]

    def _step(self, events: List[Tuple[str, str]]) -> bool:
        raise NotImplementedError


class ThinkSplitter(_StreamSplitter):
    """Splits streamed model text into reasoning (``<think>...</think>``) and answer.

    ``feed(text)`` returns ``[(kind, chunk), ...]`` with kind "reasoning" or "text"; ``finish()``
    flushes what is held back. Tags split across chunks are recognised; the whitespace around the
    reasoning (the template's ``<think>\\n`` and the ``\\n\\n`` after ``</think>``) is dropped.
    ``in_reasoning``: the prompt already opened ``<think>`` (Qwen3.5's generation prompt does when
    thinking is on). Otherwise a ``<think>`` is only recognised before any answer text.
    """

    START, REASONING_START, REASONING, ANSWER_START, ANSWER = range(5)

    def __init__(self, start: Optional[str] = "<think>", end: Optional[str] = "</think>",
                 in_reasoning: bool = False):
        self.start, self.end = start, end
        self.mode = self.REASONING_START if (in_reasoning and end) else self.START
        self.buffer = ""

    @property
    def in_reasoning(self) -> bool:
        return self.mode in (self.REASONING_START, self.REASONING)

    def finish(self) -> List[Tuple[str, str]]:
        """Everything still held back: a partial tag is text, trailing reasoning whitespace is dropped."""
        rest, self.buffer = self.buffer, ""
        if self.in_reasoning:
            return [("reasoning", rest.rstrip())] if rest.strip() else []
        if self.mode in (self.START, self.ANSWER_START):
            rest = rest.lstrip()
        return [("text", rest)] if rest else []

    def _step(self, events: List[Tuple[str, str]]) -> bool:
        """Consume part of the buffer; False when more text is needed to decide."""
        if self.mode in (self.START, self.ANSWER_START):
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            if self.mode == self.START and self.start and self.end:
                if stripped.startswith(self.start):
                    self.buffer = stripped[len(self.start):]
                    self.mode = self.REASONING_START
                    return True
                if self.start.startswith(stripped):
                    return False  # maybe the beginning of the tag
            self.buffer, self.mode = stripped, self.ANSWER
            return True
        if self.mode == self.REASONING_START:
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            self.buffer, self.mode = stripped, self.REASONING
            return True
        if self.mode == self.REASONING:
            i = self.buffer.find(self.end)
            if i >= 0:
                events.append(("reasoning", self.buffer[:i].rstrip()))
                self.buffer, self.mode = self.buffer[i + len(self.end):], self.ANSWER_START
                return True
            emit = self.buffer[:len(self.buffer) - _partial_tag_length(self.buffer, self.end)]
            body = emit.rstrip()  # trailing whitespace waits: it is dropped if `</think>` follows
            events.append(("reasoning", body))
            self.buffer = self.buffer[len(body):]
            return False
        events.append(("text", self.buffer))
        self.buffer = ""
        return False


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ------------------------------------------------------------------------------ tool calls


class ToolCallFilter(_StreamSplitter):
    """Splits answer text into text and tool calls (``<tool_call>...</tool_call>``, Qwen's format).

    ``feed(text)`` returns ``[(kind, chunk), ...]`` with kind "text" or "call" (the text between the
    tags, for the tokenizer's tool parser); ``finish()`` flushes, an unterminated call as kind
    "open_call". Tags split across chunks are recognised. Whitespace before a call and after one is
    dropped: the chat template puts its own back when it renders the call in the history.
    """

    def __init__(self, start: str = "<tool_call>", end: str = "</tool_call>"):
        self.start, self.end = start, end
        self.buffer = ""
        self.in_call = False
        self.after_call = False

    def finish(self) -> List[Tuple[str, str]]:
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            return [("open_call", rest)]
        return [("text", rest)] if rest else []

    def _step(self, events: List[Tuple[str, str]]) -> bool:
        if self.in_call:
            i = self.buffer.find(self.end)
            if i < 0:
                return False
            events.append(("call", self.buffer[:i]))
            self.buffer = self.buffer[i + len(self.end):]
            self.in_call, self.after_call = False, True
            return True
        if self.after_call:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return False
            self.after_call = False
            return True
        i = self.buffer.find(self.start)
        if i >= 0:
            events.append(("text", self.buffer[:i].rstrip()))
            self.buffer = self.buffer[i + len(self.start):]
            self.in_call = True
            return True
        head = self.buffer[:len(self.buffer) - _partial_tag_length(self.buffer, self.start)]
        body = head.rstrip()  # trailing whitespace waits: it is dropped if a call follows
        events.append(("text", body))
        self.buffer = self.buffer[len(body):]
        return False


def template_tools(tools) -> Optional[List[dict]]:
    """llm Tools -> the OpenAI-style function list that chat templates (and mlx-lm's parsers) expect."""
    out = []
    for tool in tools or []:
        if isinstance(tool, llm.Tool):
            schema = tool.input_schema or {"type": "object", "properties": {}}
            out.append({"type": "function", "function": {"name": tool.name, "description": tool.description or "",
                                                         "parameters": schema}})
    return out or None


def parse_tool_call(tokenizer, text: str, tools: Optional[List[dict]]) -> Optional[Tuple[str, dict]]:
    """(name, arguments) from the text between the tool-call tags, by the tokenizer's own parser
    (mlx-lm picks Qwen3.5's ``qwen3_coder`` from its chat template); None if it is not a call."""
    parser = getattr(tokenizer, "tool_parser", None)
    if parser is None:
        return None
    try:
        parsed = parser(text.strip(), tools)
    except Exception:  # the parsers raise ValueError, JSONDecodeError, KeyError...: not a well-formed call
        return None
    if not isinstance(parsed, dict):
        return None
    name, arguments = parsed.get("name"), parsed.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return name, arguments


class Answer:
    """The response as llm will store it (reasoning, text, tool calls), built from the model's text.

    ``route(events)`` turns ThinkSplitter events into llm StreamEvents; with tools, answer text goes
    through a ToolCallFilter and each parsed call is emitted (``tool_call_name``/``tool_call_args``
    events and ``response.add_tool_call``). ``message()`` is the assistant Message of the next turn's
    history, for the prompt cache's look-ahead.
    """

    def __init__(self, tokenizer, tools: Optional[List[dict]], response):
        self.tokenizer, self.tools, self.response = tokenizer, tools, response
        self.calls = (ToolCallFilter(tokenizer.tool_call_start, tokenizer.tool_call_end)
                      if tools and getattr(tokenizer, "tool_call_start", None) else None)
        self.reasoning: List[str] = []
        self.text: List[str] = []
        self.tool_calls: List[llm.ToolCall] = []

    def route(self, events, final: bool = False) -> Iterator:
        from llm.parts import StreamEvent

        for kind, chunk in events:
            if kind == "reasoning":
                self.reasoning.append(chunk)
                yield StreamEvent(type="reasoning", chunk=chunk)
            elif self.calls is None:
                self.text.append(chunk)
                yield StreamEvent(type="text", chunk=chunk)
            else:
                yield from self._answer(self.calls.feed(chunk))
        if final and self.calls is not None:
            yield from self._answer(self.calls.finish())

    def _answer(self, events) -> Iterator:
        import uuid

        from llm.parts import StreamEvent

        for kind, chunk in events:
            if kind == "text":
                self.text.append(chunk)
                yield StreamEvent(type="text", chunk=chunk)
                continue
            parsed = parse_tool_call(self.tokenizer, chunk, self.tools)
            if parsed is None:  # not a call after all: show it as the model wrote it
                raw = self.calls.start + chunk + (self.calls.end if kind == "call" else "")
                self.text.append(raw)
                yield StreamEvent(type="text", chunk=raw)
                continue
            name, arguments = parsed
            call = llm.ToolCall(name=name, arguments=arguments, tool_call_id=f"call_{uuid.uuid4().hex[:24]}")
            self.tool_calls.append(call)
            yield StreamEvent(type="tool_call_name", chunk=name, tool_call_id=call.tool_call_id)
            yield StreamEvent(type="tool_call_args", chunk=json.dumps(arguments), tool_call_id=call.tool_call_id)
            self.response.add_tool_call(call)

    def message(self):
        from llm.parts import Message, ReasoningPart, TextPart, ToolCallPart

        parts = []
        if "".join(self.reasoning):
            parts.append(ReasoningPart(text="".join(self.reasoning)))
        if "".join(self.text):
            parts.append(TextPart(text="".join(self.text)))
        parts += [ToolCallPart(name=c.name, arguments=c.arguments, tool_call_id=c.tool_call_id)
                  for c in self.tool_calls]
        return Message(role="assistant", parts=parts)


# ------------------------------------------------------------------------------ prompt rendering

PROBE = "x"  # stand-in content for the look-ahead renderings of the next turn


def chat_messages(messages) -> List[dict]:
    """llm Messages (``prompt.messages``: system, history, new turn) -> chat-template messages.

    Text, reasoning (as ``reasoning_content``), tool calls and tool results reach the template.
    Qwen's template shows an assistant turn's reasoning only while it is part of the current tool-calling
    exchange (after the last user message) and drops it from older history. All system text is merged
    into one leading system message.
    """
    from llm.parts import ReasoningPart, TextPart, ToolCallPart, ToolResultPart

    system: List[str] = []
    out: List[dict] = []
    for message in messages:
        if message.role == "tool":
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    result = {"role": "tool", "content": part.output, "name": part.name}
                    if part.tool_call_id:
                        result["tool_call_id"] = part.tool_call_id
                    out.append(result)
            continue
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        if message.role == "system":
            if text:
                system.append(text)
            continue
        entry = {"role": message.role, "content": text}
        if message.role == "assistant":
            reasoning = "".join(p.text for p in message.parts if isinstance(p, ReasoningPart) and not p.redacted)
            if reasoning:
                entry["reasoning_content"] = reasoning
            calls = [p for p in message.parts if isinstance(p, ToolCallPart) and not p.server_executed]
            if calls:
                entry["tool_calls"] = [{"type": "function", "id": p.tool_call_id,
                                        "function": {"name": p.name, "arguments": dict(p.arguments or {})}}
                                       for p in calls]
        out.append(entry)
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


def render_prompt(tokenizer, messages: List[dict], thinking: bool, tools: Optional[List[dict]] = None,
                  generation_prompt: bool = True) -> str:
    """The prompt text the model sees, through the model's own chat template (tools included)."""
    if not getattr(tokenizer, "has_chat_template", False):
        if tools:
            raise FlashMoeError("this model has no chat template, so it cannot be given tools")
        return "\n\n".join(m["content"] for m in messages)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                             enable_thinking=thinking, tokenize=False)
    except Exception as e:  # jinja's TemplateError and friends: the template refused these messages
        raise FlashMoeError(f"the chat template rejected this conversation: {str(e).splitlines()[0]}")


def history_ids(tokenizer, messages: List[dict], tools, thinking: bool) -> Optional[List[int]]:
    """Token ids of ``messages`` rendered as history (no generation prompt); None if the template refuses."""
    try:
        text = render_prompt(tokenizer, messages, thinking, tools, generation_prompt=False)
    except FlashMoeError:
        return None
    return tokenizer.encode(text, add_special_tokens=False)


def reuse_point(tokenizer, messages: List[dict], tools, thinking: bool, prompt_ids: List[int]) -> Optional[int]:
    """How much of this prompt the *next* turn will start with: where this prompt and the rendering of
    this conversation plus one more exchange part ways, if inside the prompt.

    With Qwen3.5's template that is right after this turn's ``<|im_start|>assistant\\n``: the
    generation prompt goes on with ``<think>\\n`` (or an empty think block), while history shows the
    answer without its reasoning.
    """
    from mlx_lm.utils import common_prefix_len

    probe = history_ids(tokenizer, messages + [{"role": "assistant", "content": PROBE},
                                               {"role": "user", "content": PROBE}], tools, thinking)
    if probe is None:
        return None
    n = common_prefix_len(prompt_ids, probe)
    return n if 0 < n < len(prompt_ids) else None


def next_turns(tokenizer, history, answer, tools, thinking: bool) -> List[List[int]]:
    """Token ids of the conversation as the next turn will render it: after a user message, and (when
    the answer called tools) after the tool results. What the prompt cache may keep is judged by them."""
    from llm.parts import Message, TextPart, ToolCallPart, ToolResultPart

    base = list(history) + [answer]
    probes = [base + [Message(role="user", parts=[TextPart(text=PROBE)])]]
    calls = [p for p in answer.parts if isinstance(p, ToolCallPart)]
    if calls:
        probes.append(base + [Message(role="tool", parts=[
            ToolResultPart(name=c.name, output=PROBE, tool_call_id=c.tool_call_id) for c in calls])])
    out = []
    for probe in probes:
        ids = history_ids(tokenizer, chat_messages(probe), tools, thinking)
        if ids is not None:
            out.append(ids)
    return out


def prompt_opens_reasoning(prompt_text: str, tokenizer) -> bool:
    """True when the rendered prompt leaves a ``<think>`` open, so the output starts as reasoning."""
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    if not start or not end:
        return False
    return prompt_text.rfind(start) > prompt_text.rfind(end)


# ------------------------------------------------------------------------------ settings


@dataclass
class Settings:
    """One response's generation settings, options resolved against the model's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: Optional[int]
    experts_per_token: int
    thinking: bool
    prompt_cache: bool = True


def generation_defaults(model_dir: Path) -> dict:
    """temperature / top_p / top_k from the model's generation_config.json, else Qwen3.5's."""
    defaults = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "top_k": DEFAULT_TOP_K}
    try:
        config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return defaults
    for key in defaults:
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            defaults[key] = config[key]
    return defaults


def check_experts(experts: Optional[int], manifest, model_id: str) -> int:
    """The experts-per-token to use: the option, checked against the model, or the model's default."""
    if experts is None:
        return manifest.experts_per_token
    if not 1 <= experts <= manifest.num_experts:
        raise FlashMoeError(
            f"-o experts must be between 1 and {manifest.num_experts} for {model_id} "
            f"(default {manifest.experts_per_token}), not {experts}"
        )
    return experts


def pick(value, default):
    """An option's value, or its default when the option was not given."""
    return default if value is None else value


def vocab_size(config: dict) -> Optional[int]:
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return size if isinstance(size, int) else None


def warn(message: str) -> None:
    import click

    click.echo(f"Warning: {message}", err=True)


def resolve_settings(options, manifest, model_dir: Path, model_id: str, has_thinking: bool,
                     vocab_size: Optional[int] = None, thinking: Optional[bool] = None) -> Settings:
    """``vocab_size`` bounds top_k; ``thinking``: the conversation's earlier choice, used when
    ``-o thinking`` is not given."""
    defaults = generation_defaults(model_dir)
    top_k = int(pick(options.top_k, defaults["top_k"]))
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0  # every token: the same as no top-k (mlx-lm refuses a top_k as large as the vocabulary)
    return Settings(
        max_tokens=pick(options.max_tokens, DEFAULT_MAX_TOKENS),
        temperature=float(pick(options.temperature, defaults["temperature"])),
        top_p=float(pick(options.top_p, defaults["top_p"])),
        top_k=top_k,
        min_p=float(pick(options.min_p, DEFAULT_MIN_P)),
        seed=options.seed,
        experts_per_token=check_experts(options.experts, manifest, model_id),
        thinking=bool(pick(options.thinking, pick(thinking, has_thinking))),
        prompt_cache=bool(pick(options.prompt_cache, True)),
    )


# ------------------------------------------------------------------------------ loading


def load(model_dir: Path, bank_bytes: Optional[int] = None):
    """The FlashModel of ``model_dir``, loaded once per process (reloaded if it was prepared again);
    ``bank_bytes``: its expert bank's budget when it is loaded now (None: automatic)."""
    from . import engine, leader

    model_dir = Path(model_dir)
    try:
        key = (str(model_dir), (model_dir / "manifest.json").stat().st_mtime_ns)
    except FileNotFoundError:
        raise FlashMoeError(f"{model_dir} has no manifest.json any more (is a `prepare --repair` running?); "
                            "run `llm flash-moe models`")
    flash = _LOADED.get(key)
    if flash is None:
        unload(model_dir)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
        flash = engine.load_flash_model(model_dir, bank_bytes=bank_bytes)
        try:
            leader.attach_leader(flash)  # rank 0 of a cluster (`llm flash-moe worker`): joins the other ranks
        except BaseException:
            flash.close()
            raise
        _LOADED[key] = flash
    return flash


def unload(model_dir: Optional[Path] = None) -> None:
    """Forget (and close) loaded models: those of ``model_dir``, or all."""
    for key in list(_LOADED):
        if model_dir is None or key[0] == str(Path(model_dir)):
            _LOADED.pop(key).close()


# ------------------------------------------------------------------------------ one pass through the model

PREFILL_STEP = 2048  # mlx-lm's generate_step default (prefill_step_size)

# One generation at a time per process: the sync and the async model share the loaded model.
_GENERATION_LOCK = threading.RLock()


def prefill(model, cache, tokens: List[int]) -> None:
    """Run ``tokens`` through the model into ``cache`` (as mlx-lm's generate_step prefills)."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    with mx.stream(generation_stream):
        for i in range(0, len(tokens), PREFILL_STEP):
            model(mx.array(tokens[i:i + PREFILL_STEP])[None], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()


class Turn:
    """One response's pass through the model, continuing from the longest cached prefix of its prompt.

    ``steps()`` looks the prompt up in ``store`` (a PromptCache, or None for a full prefill), processes
    the prompt up to ``checkpoint`` (see ``reuse_point``) and snapshots the state there, then lets
    mlx-lm's ``stream_generate`` process the rest and generate. ``save(next_turns)`` keeps the snapshots
    the next turn can use: the state after prompt + generated tokens when the next turn's rendering
    starts with exactly those tokens (Qwen3.5: a tool call continued by its results), and the state at
    the checkpoint when the next turn goes on from there (Qwen3.5: a new user message; the history shows
    the previous answer without its reasoning, so the answer's tokens are processed again).
    """

    def __init__(self, flash, prompt_ids: List[int], store=None, checkpoint: Optional[int] = None):
        self.flash, self.prompt_ids, self.store, self.checkpoint = flash, list(prompt_ids), store, checkpoint
        self.cached = 0
        self.source: Optional[str] = None
        self.generated: List[int] = []
        self.finished = False
        self.prompt_seconds: Optional[float] = None
        self.saved: List[int] = []
        self._cache = None
        self._mid = None

    @property
    def processed(self) -> int:
        return len(self.prompt_ids) - self.cached

    def steps(self, max_tokens: int, sampler) -> Iterator:
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache

        from . import prompt_cache

        started = time.perf_counter()
        hit = self.store.lookup(self.prompt_ids) if self.store is not None else None
        if hit is not None:
            cache, self.cached, self.source = hit.caches, hit.length, hit.source
        else:
            cache = make_prompt_cache(self.flash.model)
        self._cache = cache
        position = self.cached
        if self.store is not None and self.checkpoint is not None and position < self.checkpoint:
            prefill(self.flash.model, cache, self.prompt_ids[position:self.checkpoint])
            self._mid = prompt_cache.freeze(cache)
            position = self.checkpoint
        for response in mlx_lm.stream_generate(self.flash.model, self.flash.tokenizer, self.prompt_ids[position:],
                                               max_tokens=max_tokens, sampler=sampler, prompt_cache=cache):
            if self.prompt_seconds is None:
                self.prompt_seconds = time.perf_counter() - started
            self.generated.append(response.token)
            yield response
        self.finished = True

    def save(self, next_turns: List[List[int]]) -> None:
        from mlx_lm.utils import common_prefix_len

        from . import prompt_cache

        if self.store is None or not self.finished:
            return
        full = self.prompt_ids + self.generated
        reach = [common_prefix_len(full, ids) for ids in next_turns]
        # The cache holds prompt + every generated token (mlx-lm feeds each sampled token before
        # yielding it); checked, so a state is never filed under tokens it did not see.
        end_saved = False
        if len(full) in reach and prompt_cache.kv_length(self._cache) in (None, len(full)):
            self.store.save(full, prompt_cache.freeze(self._cache))
            end_saved = True
            self.saved.append(len(full))
        if self._mid is not None and any(r >= self.checkpoint and not (end_saved and r == len(full))
                                         for r in reach):
            self.store.save(self.prompt_ids[:self.checkpoint], self._mid)
            self.saved.append(self.checkpoint)
        self._cache = self._mid = None


# ------------------------------------------------------------------------------ the models


class _FlashMoe:
    """What the sync and the async ``<name>-flash`` models share."""

    can_stream = True
    supports_tools = True

    class Options(llm.Options):
        max_tokens: Optional[int] = Field(
            None, description=f"Maximum tokens to generate, reasoning included (default {DEFAULT_MAX_TOKENS}; "
                              "-1: no limit)", ge=-1)
        temperature: Optional[float] = Field(
            None, description=f"Sampling temperature; 0 is greedy (default: the model's generation_config.json, "
                              f"{DEFAULT_TEMPERATURE} for Qwen3.5)", ge=0, allow_inf_nan=False)
        top_p: Optional[float] = Field(
            None, description=f"Nucleus sampling top-p (default: the model's, {DEFAULT_TOP_P} for Qwen3.5)",
            ge=0, le=1, allow_inf_nan=False)
        top_k: Optional[int] = Field(
            None, description=f"Sample from the k most likely tokens; 0 is off (default: the model's, "
                              f"{DEFAULT_TOP_K} for Qwen3.5)", ge=0)
        min_p: Optional[float] = Field(
            None, description=f"Min-p sampling (default {DEFAULT_MIN_P})", ge=0, le=1, allow_inf_nan=False)
        seed: Optional[int] = Field(None, description="Random seed, for repeatable sampling", ge=0, le=2**64 - 1)
        experts: Optional[int] = Field(
            None, description="Experts per token, 1 to the model's expert count (default: chosen at prepare time; "
                              "4 for qwen397). Fewer is faster and reads less, at some cost in quality", ge=1)
        thinking: Optional[bool] = Field(
            None, description="Let the model think before answering; its thinking is shown as reasoning "
                              "(default: the conversation's earlier choice, else on when the model can think)")
        bank_gb: Optional[float] = Field(
            None, description="Expert bank budget in GB: the experts kept in memory where the kernels read them "
                              "(GPU memory on CUDA, unified memory/RAM elsewhere), read from disk only when "
                              "missing (default: the free memory less a reserve, chosen when the model loads)",
            ge=0, allow_inf_nan=False)
        prompt_cache: Optional[bool] = Field(
            None, description="Reuse the model state of the conversation so far (kept in memory and on disk) "
                              "so a follow-up only processes its new tokens (default on)")

        @field_validator("max_tokens")
        @classmethod
        def _no_zero_tokens(cls, value):
            if value == 0:
                raise ValueError("max_tokens must be at least 1, or -1 for no limit")
            return value

    def __init__(self, name: str):
        self.name = name
        self.model_id = model_id_for(name)

    def __str__(self) -> str:
        return f"Flash MoE: {self.model_id}"

    def model_dir(self) -> Path:
        path = registry.prepared().get(self.name)
        if path is None:
            raise llm.ModelError(not_prepared_message(self.name))
        return path

    def _events(self, prompt, response, conversation) -> Iterator:
        from . import leader

        try:
            with _GENERATION_LOCK:
                yield from leader.guard(self._generate(prompt, response, conversation))  # rank 0 of a cluster
        except FlashMoeError as e:
            raise llm.ModelError(str(e)) from None

    def _generate(self, prompt, response, conversation) -> Iterator:
        import mlx.core as mx

        from . import prompt_cache

        conversation_id = getattr(conversation, "id", None)
        flash, settings = self._ready(prompt.options, prompt_cache.recall(conversation_id).get("thinking"))
        tokenizer = flash.tokenizer
        tools = template_tools(prompt.tools)
        if tools and not getattr(tokenizer, "has_tool_calling", False):
            raise FlashMoeError(f"{self.model_id} cannot call tools: its chat template has no tool-call format")
        messages = chat_messages(prompt.messages)
        text = render_prompt(tokenizer, messages, settings.thinking, tools)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        if not prompt_ids:
            raise FlashMoeError(f"the tokenizer of {self.model_id} turned the prompt into no tokens; "
                                f"run `llm flash-moe verify {self.name}`")
        splitter = ThinkSplitter(tokenizer.think_start, tokenizer.think_end,
                                 in_reasoning=prompt_opens_reasoning(text, tokenizer))
        answer = Answer(tokenizer, tools, response)
        store = self._prompt_cache(flash) if settings.prompt_cache else None
        checkpoint = reuse_point(tokenizer, messages, tools, settings.thinking, prompt_ids) if store else None
        turn = Turn(flash, prompt_ids, store, checkpoint)
        if settings.seed is not None:
            mx.random.seed(settings.seed)
        sampler = make_sampler(settings)
        stats_before = replace(flash.bank.stats)
        mx.reset_peak_memory()
        last = None
        try:
            for last in turn.steps(settings.max_tokens, sampler):
                check_finite(last, self.name)
                yield from answer.route(splitter.feed(last.text))
            yield from answer.route(splitter.finish(), final=True)
            turn.save(next_turns(tokenizer, prompt.messages, answer.message(), tools, settings.thinking))
        finally:
            record_usage(response, last, turn, settings, flash.bank.stats.since(stats_before), flash.bank)
        prompt_cache.remember(conversation_id, thinking=settings.thinking)

    def _prompt_cache(self, flash):
        """This model's PromptCache for its current settings, or None if its cache types are unknown to us."""
        from mlx_lm.models.cache import make_prompt_cache

        from . import prompt_cache

        if not prompt_cache.supported(make_prompt_cache(flash.model)):
            return None
        return prompt_cache.PromptCache(self.name, prompt_cache.identity(flash))

    def _ready(self, options, thinking: Optional[bool] = None):
        """The loaded model, set up for this response's options, and the resolved settings."""
        from .flash_layout import Manifest

        model_dir = self.model_dir()
        manifest = Manifest.load(model_dir)
        check_experts(options.experts, manifest, self.model_id)  # a bad value fails before the slow load
        from . import engine

        loaded = _LOADED.get((str(model_dir), (model_dir / "manifest.json").stat().st_mtime_ns))
        bank_bytes = None
        if options.bank_gb is not None:
            bank_bytes, warning = engine.clamp_bank_bytes(int(options.bank_gb * 1e9), manifest,
                                                          held=loaded.bank.nbytes if loaded else 0,
                                                          loaded=loaded is not None)
            if warning:
                warn(warning)
        flash = load(model_dir, bank_bytes=bank_bytes)
        if bank_bytes is not None:
            flash.set_bank_bytes(bank_bytes)
        settings = resolve_settings(options, manifest, model_dir, self.model_id, flash.tokenizer.has_thinking,
                                    vocab_size=vocab_size(manifest.config),
                                    thinking=thinking)
        flash.set_experts_per_token(settings.experts_per_token)
        return flash, settings


class FlashMoeModel(_FlashMoe, llm.Model):
    """A prepared Mixture-of-Experts model, experts streamed from disk (``<name>-flash``)."""

    def execute(self, prompt, stream, response, conversation) -> Iterator:
        yield from self._events(prompt, response, conversation)


class FlashMoeAsyncModel(_FlashMoe, llm.AsyncModel):
    """The same model for llm's async API: generation runs in one worker thread (the model is shared
    with the sync model, one generation at a time) and streams through an asyncio queue; the thread is
    joined before ``execute`` returns, also when the consumer stops early."""

    async def execute(self, prompt, stream, response, conversation):
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                pass

        def work() -> None:
            events = self._events(prompt, response, conversation)
            try:
                for event in events:
                    put(("event", event))
                    if stop.is_set():
                        break
            except BaseException as e:  # handed to the consumer, raised there
                put(("error", e))
            finally:
                events.close()
                put(("done", None))

        thread = threading.Thread(target=work, name=f"flash-moe-{self.model_id}", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "event":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)


def make_sampler(settings: Settings):
    """mlx-lm's sampler for these settings (tests replace it to steer the model's output)."""
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    return mlx_make_sampler(settings.temperature, settings.top_p, settings.min_p, top_k=settings.top_k)


def check_finite(step, name: str) -> None:
    """Stop before a token sampled from NaN or infinite logits reaches the user (damaged weights).

    Any NaN in the logits makes every log-probability NaN, the sampled token's included; one scalar
    check per token (already computed by mlx-lm) catches it.
    """
    logprobs = getattr(step, "logprobs", None)
    if logprobs is None:
        return
    value = logprobs.reshape(-1)[step.token].item()
    if not math.isfinite(value):
        raise FlashMoeError(
            f"{model_id_for(name)} produced non-finite values (NaN or infinity) at token "
            f"{step.generation_tokens}: its weights are damaged; run `llm flash-moe verify {name}`"
        )


def record_usage(response, last, turn: Turn, settings: Settings, stats, bank) -> None:
    """Token usage and ``response_json``: what this run cost (also after an interrupted one).

    ``stats``: the expert bank's BankStats for this response alone (``stats.since(before)``).
    """
    generated = last.generation_tokens if last is not None else 0
    prompt_tokens = len(turn.prompt_ids)
    response.set_usage(input=prompt_tokens, output=generated)
    prompt_tps = None
    if turn.prompt_seconds is not None:
        prompt_tps = round(turn.processed / max(turn.prompt_seconds, 1e-9), 3)
    response.response_json = {
        "finish_reason": getattr(last, "finish_reason", None) or "interrupted",
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_cached": turn.cached,
        "prompt_tokens_processed": turn.processed,
        "prompt_cache": turn.source,
        "prompt_cache_saved": list(turn.saved),
        "generation_tokens": generated,
        "thinking": settings.thinking,
        "prompt_tps": prompt_tps,
        "generation_tps": round(last.generation_tps, 3) if last is not None else None,
        "experts_per_token": settings.experts_per_token,
        "bytes_read": stats.bytes_read,
        "expert_reads": stats.reads,
        "bank_gb": round(bank.nbytes / 1e9, 6),
        "bank_hits": stats.hits,
        "bank_hit_rate": round(stats.hit_rate, 4),
        "prefetch_reads": stats.prefetch_reads,
        "read_seconds": round(stats.read_wait_seconds, 4),
        "peak_memory_gb": round(last.peak_memory, 3) if last is not None else None,
    }
