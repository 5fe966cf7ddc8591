"""The model's streamed text as llm's response: reasoning, answer text and tool calls.

Tags are matched by mlx-lm's ``TextStateMachine`` (tags split across chunks are recognised, and
stripped). Three things differ from the machine ``make_text_state_machine`` builds for mlx-lm's server,
each covered by a test (tests/test_plugin.py, tests/test_conversations.py):

- a ``<think>`` opens reasoning only before the answer starts (mlx-lm's opens it anywhere in the answer,
  hiding the rest of an answer that mentions the tag);
- tool calls are split out only when the prompt gave tools (mlx-lm's always does, and drops the tags);
- the whitespace around reasoning and tool calls is dropped (the template's ``<think>\\n`` and the
  ``\\n\\n`` after ``</think>``; the chat template puts its own back when it renders the history).
"""

from __future__ import annotations

import json
from typing import Iterator, List, Optional, Tuple

import llm

REASONING, NORMAL, TOOL = "reasoning", "normal", "tool"


def opens_reasoning(tokenizer, prompt_ids: List[int]) -> bool:
    """True when the prompt leaves a ``<think>`` open, so the output starts as reasoning (as mlx-lm's
    server decides it: Qwen3.5's generation prompt ends with ``<think>\\n`` when thinking is on)."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    return tokenizer.rfind_think_start(prompt_ids) > tokenizer.rfind_think_end(prompt_ids)


class ReplySplitter:
    """Splits streamed model text into ``(kind, chunk)`` events: kind "reasoning", "text", "call" (the text
    between the tool-call tags, for the tokenizer's tool parser) or, from ``finish()``, "open_call" (a call
    the output ended in).

    ``think``: the (start, end) reasoning tags, or None; ``calls``: the (start, end) tool-call tags, only
    when the prompt gave tools; ``in_reasoning``: the prompt already opened reasoning.
    """

    def __init__(self, think: Optional[Tuple[str, str]], calls: Optional[Tuple[str, str]] = None,
                 in_reasoning: bool = False):
        from mlx_lm.generate import TextStateMachine

        transitions = {NORMAL: [], REASONING: [], TOOL: []}
        if think:
            transitions[REASONING].append((think[1], NORMAL))
        if calls:
            transitions[NORMAL].append((calls[0], TOOL))
            transitions[TOOL].append((calls[1], NORMAL))
        self.machine = TextStateMachine(transitions)
        self.think_start = think[0] if think else None
        self.state = self.machine.make_state(REASONING) if (think and in_reasoning) else None
        self.opening = ""  # text before the answer or reasoning began: is it a <think>?
        self.kind: Optional[str] = None  # the span being streamed, and what it holds back:
        self.started = False  # ... its leading whitespace is dropped,
        self.held = ""  # ... trailing whitespace waits (dropped when a tag follows),
        self.call = ""  # ... a tool call is sent whole.
        self.ended_in: Optional[str] = None  # the state the output ended in (set by ``finish``)

    def feed(self, text: str) -> List[Tuple[str, str]]:
        from mlx_lm.generate import TextStateMachine

        if self.state is None:
            text = self._open(text)
            if text is None:
                return []
        self.state, segments = TextStateMachine.split(self.state, text)
        return self._spans(segments)

    def finish(self) -> List[Tuple[str, str]]:
        """Everything still held back: a partial tag is text, trailing reasoning whitespace is dropped."""
        from mlx_lm.generate import TextStateMachine

        if self.state is None:
            rest, self.opening = self.opening.lstrip(), ""
            return [("text", rest)] if rest else []
        self.state, rest, kind = TextStateMachine.flush(self.state)
        self.ended_in = kind
        events = self._spans([(kind, rest)])
        if self.kind == TOOL:
            events.append(("open_call", self.call))
        elif self.kind == NORMAL and self.held:
            events.append(("text", self.held))
        self.kind = None
        return events

    def _open(self, text: str) -> Optional[str]:
        """Before anything is shown: reasoning if the output begins with ``<think>``, else the answer.
        Returns the text to split from there, or None while it cannot be told yet."""
        self.opening += text
        stripped = self.opening.lstrip()
        if not stripped:
            return None
        if self.think_start and stripped.startswith(self.think_start):
            self.state, stripped = self.machine.make_state(REASONING), stripped[len(self.think_start):]
        elif self.think_start and self.think_start.startswith(stripped):
            return None  # maybe the beginning of the tag
        else:
            self.state = self.machine.make_state(NORMAL)
        self.opening = ""
        return stripped

    def _spans(self, segments) -> List[Tuple[str, str]]:
        """Events for the machine's segments: the first continues the current span, each other one is a
        new span after a tag."""
        events: List[Tuple[str, str]] = []
        for i, (kind, text) in enumerate(segments):
            if i or self.kind is None:
                self._close(events)
                self.kind, self.started, self.held, self.call = kind, False, "", ""
            if kind == TOOL:
                self.call += text
                continue
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            body = text.rstrip()
            if body:
                events.append(("reasoning" if kind == REASONING else "text", self.held + body))
                self.held = ""
            self.held += text[len(body):]
        return events

    def _close(self, events: List[Tuple[str, str]]) -> None:
        """The current span ended at a tag: a call is complete; held whitespace before the tag is dropped."""
        if self.kind == TOOL:
            events.append(("call", self.call))


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

    ``feed(text)`` / ``finish()`` turn the streamed text into llm StreamEvents; with tools, each parsed
    call is emitted (``tool_call_name``/``tool_call_args`` events and ``response.add_tool_call``), and a
    call that does not parse is shown as the text the model wrote. ``message()`` is the assistant Message
    of the next turn's history, for the prompt cache's look-ahead.
    """

    def __init__(self, tokenizer, tools: Optional[List[dict]], response, prompt_ids: List[int]):
        self.tokenizer, self.tools, self.response = tokenizer, tools, response
        think = (tokenizer.think_start, tokenizer.think_end) if getattr(tokenizer, "has_thinking", False) else None
        self.call_tags = ((tokenizer.tool_call_start, tokenizer.tool_call_end)
                          if tools and getattr(tokenizer, "has_tool_calling", False) else None)
        self.splitter = ReplySplitter(think, self.call_tags, opens_reasoning(tokenizer, prompt_ids))
        self.reasoning: List[str] = []
        self.text: List[str] = []
        self.tool_calls: List[llm.ToolCall] = []

    def feed(self, text: str) -> Iterator:
        yield from self._route(self.splitter.feed(text))

    def finish(self) -> Iterator:
        yield from self._route(self.splitter.finish())

    def _route(self, events) -> Iterator:
        import uuid

        from llm.parts import StreamEvent

        for kind, chunk in events:
            if kind in ("reasoning", "text"):
                (self.reasoning if kind == "reasoning" else self.text).append(chunk)
                yield StreamEvent(type=kind, chunk=chunk)
                continue
            parsed = parse_tool_call(self.tokenizer, chunk, self.tools)
            if parsed is None:  # not a call after all: show it as the model wrote it
                start, end = self.call_tags
                raw = start + chunk + (end if kind == "call" else "")
                self.text.append(raw)
                yield StreamEvent(type="text", chunk=raw)
                continue
            name, arguments = parsed
            call = llm.ToolCall(name=name, arguments=arguments, tool_call_id=f"call_{uuid.uuid4().hex[:24]}")
            self.tool_calls.append(call)
            yield StreamEvent(type="tool_call_name", chunk=name, tool_call_id=call.tool_call_id)
            yield StreamEvent(type="tool_call_args", chunk=json.dumps(arguments), tool_call_id=call.tool_call_id)
            self.response.add_tool_call(call)

    @property
    def ended_in_reasoning(self) -> bool:
        """The output stopped before the model closed its reasoning (after ``finish()``)."""
        return self.splitter.ended_in == REASONING

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
